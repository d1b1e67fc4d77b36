"""Crash safety: SIGKILL featurize / fit / score at random points, resume, compare with an uninterrupted run.

Also the store's writer lock: a second writer is refused while the first is
alive (another process or this one), and the lock of a killed writer is
recovered. Every run here is a real ``python -m airtrace`` (or python)
subprocess on a small task module written by the test.

The default run kills featurize twice (then resumes), fit once and score once
(about 30 s on 2 idle cores); ``pytest -m slow tests/test_crash.py`` adds
eight more seeds per command.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from airtrace import Attributor
from airtrace.curvature import Curvature
from airtrace.store import LOCK, Store, StoreError, StoreLockedError, StoreWriter

TASK = textwrap.dedent('''
    """A small classifier task for the crash tests; CRASH_DELAY slows every batch down (seconds)."""
    import os
    import time

    import torch
    from torch import nn

    from airtrace import Task
    from airtrace.capture import per_example_loss

    N_TRAIN, N_QUERY, BATCH = 48, 5, 4
    DELAY = float(os.environ.get("CRASH_DELAY", "0"))


    def loss_fn(model, batch):
        return per_example_loss(model(batch["x"]), batch["y"])


    class Batches:
        def __init__(self, X, y, prefix):
            self.X, self.y, self.prefix = X, y, prefix

        def __iter__(self):
            for s in range(0, len(self.X), BATCH):
                time.sleep(DELAY)
                ids = [f"{self.prefix}{i}" for i in range(s, min(s + BATCH, len(self.X)))]
                yield ids, {"x": self.X[s: s + BATCH], "y": self.y[s: s + BATCH]}


    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 4))
        X, y = torch.randn(N_TRAIN + N_QUERY, 8), torch.randint(4, (N_TRAIN + N_QUERY,))
        return Task(model, loss_fn, Batches(X[:N_TRAIN], y[:N_TRAIN], "t"),
                    Batches(X[N_TRAIN:], y[N_TRAIN:], "q"), train_size=N_TRAIN)
''')
MODEL = "crash_task:build"
N_TRAIN, ROWS_PER_SHARD = 48, 4
N_SHARDS = N_TRAIN // ROWS_PER_SHARD
DELAY = 0.04  # seconds per batch in killed runs: spreads the work over ~0.5 s per pass
FEATURIZE = ["featurize", "store", "--k-in", "4", "--k-out", "3", "--seed", "3", "--dtype", "bfloat16",
             "--rows-per-shard", str(ROWS_PER_SHARD)]
FIT = ["fit", "store", "--out", "curv.safetensors", "--method", "ekfac"]
SCORE = ["score", "store", "--curvature", "curv.safetensors", "--topk", "5", "--metric", "relative",
         "--output", "scores.json", "--full-matrix", "full.safetensors"]
SLOW_SEEDS = list(range(1, 9))


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "airtrace", *args, "--model", MODEL, "--quiet"]


def _env(delay: float = 0.0) -> dict:
    return {**os.environ, "CRASH_DELAY": str(delay), "OMP_NUM_THREADS": "1"}


def _run(cwd: Path, args: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(_cli(args), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def _store_files(path: Path) -> dict[str, bytes]:
    """Manifest, shards and ids files of a store (sidecars and leftovers excluded)."""
    names = [n for n in sorted(os.listdir(path)) if n == "manifest.json" or (
        n.startswith("shard-") and n.endswith((".safetensors", ".ids.json")))]
    return {n: (path / n).read_bytes() for n in names}


def _kill_after(cwd: Path, args: list[str], delay: float, until=None) -> bool:
    """Start the command; SIGKILL it ``delay`` s after ``until(cwd)`` holds (at once when None).

    Returns:
        True when it was killed, False when it finished first.
    """
    log = cwd / "killed-run.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(_cli(args), cwd=cwd, env=_env(DELAY), stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while until is not None and not until(cwd) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        if proc.poll() is not None:
            assert proc.returncode == 0, log.read_text()
            return False
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        return True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted featurize -> fit -> score, and the time each took."""
    root = tmp_path_factory.mktemp("crash-ref")
    (root / "crash_task.py").write_text(TASK)
    times = {}
    for name, args in (("featurize", FEATURIZE), ("fit", FIT), ("score", SCORE)):
        start = time.monotonic()
        _run(root, args)
        times[name] = time.monotonic() - start
        if name == "featurize":
            store_files = _store_files(root / "store")
    return {"root": root, "store": store_files, "times": times,
            "curv": (root / "curv.safetensors").read_bytes(), "scores": (root / "scores.json").read_bytes(),
            "full": (root / "full.safetensors").read_bytes()}


def _workdir(tmp_path: Path, reference, *files: str) -> Path:
    """A fresh directory with the task module and copies of some reference outputs."""
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "crash_task.py").write_text(TASK)
    for name in files:
        source = reference["root"] / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("sidecar-*"))
        else:
            shutil.copy(source, tmp_path / name)
    return tmp_path


def _check_ids(store: Store) -> None:
    ids = store.ids
    assert len(ids) == len(set(ids)) == len(store)
    assert sorted(ids) == sorted(f"t{i}" for i in range(len(store)))


# ----------------------------------------------------------------------------- featurize


def _shards_at_least(n: int):
    return lambda cwd: len([p for p in (cwd / "store").glob("shard-*.safetensors")]) >= n if (
        cwd / "store").is_dir() else False


def _featurize_killed_and_resumed(tmp_path: Path, reference, seed: int, kills: int = 2) -> None:
    """Kill featurize ``kills`` times (each run resuming the last), then let a last run finish."""
    rng = random.Random(seed)
    cwd = _workdir(tmp_path, reference)
    path = cwd / "store"
    finished = False
    for shards in sorted(rng.sample(range(N_SHARDS), kills)):
        # 0: kill at a random time (maybe before the store exists); else once that many shard files exist
        until = None if shards == 0 else _shards_at_least(shards)
        delay = rng.uniform(0, reference["times"]["featurize"]) if shards == 0 else rng.uniform(0, DELAY)
        finished = not _kill_after(cwd, FEATURIZE, delay, until)
        if finished:
            break
        if (path / "manifest.json").exists():
            partial = Store.open(path, allow_incomplete=True)
            partial.verify()  # what the killed run committed is intact
            _check_ids(partial)
            finished = partial.complete  # killed on its way out, after close()
            if finished:
                break
            assert len(partial) % ROWS_PER_SHARD == 0
    if not finished:
        stale_lock = (path / LOCK).exists() and (path / LOCK).stat().st_size > 0
        done = _run(cwd, FEATURIZE)
        assert ("recovered the stale lock" in done.stderr) == stale_lock
    store = Store.open(path)
    assert _store_files(path) == reference["store"]
    assert sorted(os.listdir(path)) == sorted(reference["store"])  # no lock or temp file left behind
    _check_ids(store)
    assert len(store) == N_TRAIN


def test_featurize_killed_then_resumed_is_byte_identical(tmp_path, reference):
    _featurize_killed_and_resumed(tmp_path, reference, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SLOW_SEEDS)
def test_featurize_killed_more_seeds(tmp_path, reference, seed):
    _featurize_killed_and_resumed(tmp_path, reference, seed)


# ----------------------------------------------------------------------------- fit and score


def _fit_killed_and_rerun(tmp_path: Path, reference, seed: int) -> None:
    cwd = _workdir(tmp_path, reference, "store")
    out = cwd / "curv.safetensors"
    _kill_after(cwd, FIT, random.Random(seed).uniform(0, reference["times"]["fit"] + 0.5))
    if out.exists():  # never a half-written file that a rerun (or score) would trust
        assert out.read_bytes() == reference["curv"]
    _run(cwd, FIT)
    assert out.read_bytes() == reference["curv"]
    Curvature.load(out)
    assert _store_files(cwd / "store") == reference["store"]


def _score_killed_and_rerun(tmp_path: Path, reference, seed: int) -> None:
    cwd = _workdir(tmp_path, reference, "store", "curv.safetensors")
    _kill_after(cwd, SCORE, random.Random(seed).uniform(0, reference["times"]["score"] + 0.5))
    if (cwd / "scores.json").exists():  # never a half-written file
        assert (cwd / "scores.json").read_bytes() == reference["scores"]
    if (cwd / "full.safetensors").exists():
        assert _full_matrix(cwd) == _full_matrix(reference["root"])
    _run(cwd, SCORE)
    assert (cwd / "scores.json").read_bytes() == reference["scores"]
    assert _full_matrix(cwd) == _full_matrix(reference["root"])
    result = json.loads((cwd / "scores.json").read_text())
    assert len(result["topk"]) == 5 * len(result["query_ids"])
    for query in result["query_ids"]:
        ids = [row["train_id"] for row in result["topk"] if row["query_id"] == query]
        assert len(ids) == len(set(ids)) == 5
    assert _store_files(cwd / "store") == reference["store"]


def _full_matrix(cwd: Path) -> tuple[bytes, dict]:
    """The score matrix bytes and its metadata, less the store's absolute path."""
    with safe_open(str(cwd / "full.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["airtrace.scores"])
        data = f.get_tensor("scores").numpy().tobytes()
    meta.pop("store")
    return data, meta


def test_fit_killed_then_rerun_is_identical(tmp_path, reference):
    _fit_killed_and_rerun(tmp_path, reference, seed=0)


def test_score_killed_then_rerun_is_identical(tmp_path, reference):
    _score_killed_and_rerun(tmp_path, reference, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SLOW_SEEDS)
def test_fit_and_score_killed_more_seeds(tmp_path, reference, seed):
    _fit_killed_and_rerun(tmp_path / "fit", reference, seed)
    _score_killed_and_rerun(tmp_path / "score", reference, seed)


def test_reference_scores_equal_the_python_api(reference, monkeypatch):
    """The uninterrupted CLI outputs are the real thing (not just self-consistent)."""
    monkeypatch.syspath_prepend(str(reference["root"]))
    import crash_task

    task = crash_task.build()
    attributor = Attributor.from_store(task.model, reference["root"] / "store", loss_fn=task.loss_fn)
    attributor.load_curvature(reference["root"] / "curv.safetensors")
    scores = attributor.score(task.queries, reference["root"] / "store", topk=5, metric="relative", progress=False)
    result = json.loads(reference["scores"])
    assert [r["train_id"] for r in result["topk"]] == [r["train_id"] for r in scores.to_rows()]
    torch.testing.assert_close(torch.tensor([r["score"] for r in result["topk"]]), scores.values.flatten(),
                               rtol=0, atol=0)


# ----------------------------------------------------------------------------- writer lock

HOLDER = textwrap.dedent('''
    import os, signal, sys
    import torch
    from airtrace.store import StoreWriter
    w = StoreWriter(sys.argv[1], "sha256:" + "ab" * 32, 3, "float32", 2)
    w.append(torch.ones(5, 3), ["a", "b", "c", "d", "e"])  # two shards committed, one row buffered
    print("locked", flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.read()  # hold the lock until the parent closes our stdin
    w.close()
''')


def _writer(path):
    return StoreWriter(path, "sha256:" + "ab" * 32, 3, "float32", 2)


def test_second_writer_is_refused_while_the_first_is_alive(tmp_path):
    path = tmp_path / "store"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), "hold"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError) as info:
            _writer(path)
        message = str(info.value)
        assert str(path / LOCK) in message and f"pid {holder.pid} " in message
        assert info.value.owner["pid"] == holder.pid and info.value.lock_path == str(path / LOCK)
        assert sorted(os.listdir(path)) == sorted([LOCK, "manifest.json", "shard-00000.safetensors",
                                                   "shard-00001.safetensors"])  # the refused writer touched nothing
    finally:
        holder.stdin.close()
        assert holder.wait(60) == 0
    assert not (path / LOCK).exists()
    store = Store.open(path)
    assert store.ids == ["a", "b", "c", "d", "e"]


def test_stale_lock_of_a_killed_writer_is_recovered(tmp_path, caplog):
    path = tmp_path / "store"
    killed = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), "kill"], stdout=subprocess.PIPE, text=True)
    assert killed.stdout.read().strip() == "locked" and killed.wait(60) == -signal.SIGKILL
    killed.stdout.close()
    owner = json.loads((path / LOCK).read_text())
    assert owner["pid"] == killed.pid
    with caplog.at_level("WARNING", logger="airtrace"):
        w = _writer(path)
    assert w._lock.recovered == owner
    assert f"{path / LOCK} of pid {killed.pid} on host" in caplog.text and "no longer running" in caplog.text
    assert w.done_ids == ["a", "b", "c", "d"]  # the committed shards survived the kill
    w.append(torch.ones(1, 3), ["e"])
    assert w.close().ids == ["a", "b", "c", "d", "e"]
    assert not (path / LOCK).exists()


def test_two_writers_in_one_process_and_release_on_error(tmp_path):
    path = tmp_path / "store"
    first = _writer(path)
    with pytest.raises(StoreLockedError, match="this process"):
        _writer(path)
    with pytest.raises(RuntimeError):
        with first:
            first.append(torch.ones(3, 3), ["a", "b", "c"])
            raise RuntimeError("the featurize loop failed")
    assert not (path / LOCK).exists()  # released, not finished: the next writer resumes
    second = _writer(path)
    assert second.done_ids == ["a", "b"]
    second.close()
    with pytest.raises(StoreError, match="already complete"):  # an open that fails releases the lock
        _writer(path)
    assert not (path / LOCK).exists()
    _writer(path / "sub").abort()
    assert sorted(os.listdir(path / "sub")) == ["manifest.json"]
