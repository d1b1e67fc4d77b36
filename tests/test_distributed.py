"""Distributed featurize / fit / score on 2 gloo ranks (CPU) equal the single-process results.

Two launches: torch.multiprocessing.spawn with a file:// rendezvous for the Python
API, and ``torchrun --nproc-per-node 2 -m airtrace ...`` for the CLI. The single
process reference runs in the test process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

from airtrace import Attributor, Task, cli, distributed
from airtrace.capture import per_example_loss
from airtrace.attribute.ranks import rank_store_path
from airtrace.store import MANIFEST, Store, StoreError, StoreWriter, merge_stores

HERE = Path(__file__).resolve().parent
N_TRAIN, N_QUERY, BATCH, ROWS_PER_SHARD = 26, 5, 4, 5
PROJECTION = dict(k_in=3, k_out=4, seed=11)
GROUPS = [[0, 1, 2], [25], list(range(7, 20)), [3, 3, 24]]
TOPK = 6


def loss_fn(model, batch):
    return per_example_loss(model(batch["x"]), batch["y"])


def _batches(X, y, prefix):
    return [([f"{prefix}{i}" for i in range(s, min(s + BATCH, len(X)))], {"x": X[s: s + BATCH], "y": y[s: s + BATCH]})
            for s in range(0, len(X), BATCH)]


def task():
    """The CLI factory: an MLP classifier on random data, 7 training batches (the last of 2 examples)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))
    X, y = torch.randn(N_TRAIN + N_QUERY, 5), torch.randint(4, (N_TRAIN + N_QUERY,))
    return Task(model, loss_fn, _batches(X[:N_TRAIN], y[:N_TRAIN], "t"), _batches(X[N_TRAIN:], y[N_TRAIN:], "q"))


def pipeline(root: Path) -> dict:
    """featurize -> fit (ekfac, fisher) -> score (inner + groups, relative) under whatever process group is active."""
    t = task()
    attributor = Attributor(t.model, "*", loss_fn=loss_fn, projection=PROJECTION, curvature="ekfac")
    store = attributor.featurize(t.train, root / "store", dtype="float32", rows_per_shard=ROWS_PER_SHARD,
                                 progress=False)
    ekfac = attributor.fit(t.train, root / "ekfac.safetensors", store=store, progress=False)
    inner = attributor.score(t.queries, store, topk=TOPK, groups=GROUPS, progress=False)
    relative = attributor.score(t.queries, store, topk=TOPK, metric="relative", progress=False)
    fisher = Attributor.from_store(t.model, store, loss_fn=loss_fn, curvature="fisher").fit(t.train, progress=False)
    return {"ekfac": {f"{n}/{k}": v for n, inv in ekfac.inverses.items() for k, v in inv.tensors().items()},
            "fisher": {f"{n}/{k}": v for n, inv in fisher.inverses.items() for k, v in inv.tensors().items()},
            "inner": (inner.values, inner.indices, inner.ids, inner.groups), "relative": (relative.values,
                                                                                         relative.indices)}


def _worker(rank: int, world: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world)
    try:
        result = pipeline(Path(root) / "dist")
        torch.save(result, Path(root) / f"result-{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    return root, pipeline(root)


def _assert_same_store(a: Path, b: Path) -> None:
    """Byte-identical manifest and shards (sidecar names hold a curvature digest, which differs in round-off)."""
    names = sorted(n for n in os.listdir(a) if not n.startswith("sidecar-"))
    assert names == sorted(n for n in os.listdir(b) if not n.startswith("sidecar-"))
    assert MANIFEST in names and len(names) == 1 + 6  # 26 rows in shards of 5
    for name in names:
        if (a / name).read_bytes() != (b / name).read_bytes():
            detail = ""
            if name.endswith(".safetensors"):
                x, y = load_file(a / name)["features"], load_file(b / name)["features"]
                detail = f": features differ by up to {float((x - y).abs().max()):.3g}"
            pytest.fail(f"{name} differs between {a} and {b}{detail}")


def _assert_same_factors(got: dict, want: dict) -> None:
    """Factors equal to float64 round-off; eigenvectors up to sign (summation order differs)."""
    assert got.keys() == want.keys()
    for key, w in want.items():
        g = got[key]
        if "eigvecs" in key:
            g, w = g.abs(), w.abs()
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9 * float(w.abs().max()), msg=key)


def test_api_two_ranks_equal_single_process(single, tmp_path):
    root, want = single
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    _assert_same_store(tmp_path / "dist" / "store", root / "store")
    assert not (tmp_path / "dist" / "store.parts").exists()
    assert any(n.startswith("sidecar-self_influence-") for n in os.listdir(tmp_path / "dist" / "store"))
    assert Store.open(tmp_path / "dist" / "store").ids == [f"t{i}" for i in range(N_TRAIN)]
    saved = {k: v for k, v in load_file(tmp_path / "dist" / "ekfac.safetensors").items()}
    _assert_same_factors(saved, load_file(root / "ekfac.safetensors"))
    for rank in range(2):
        got = torch.load(tmp_path / f"result-{rank}.pt")
        _assert_same_factors(got["ekfac"], want["ekfac"])
        _assert_same_factors(got["fisher"], want["fisher"])
        values, indices, ids, groups = got["inner"]
        assert torch.equal(indices, want["inner"][1]) and ids == want["inner"][2]
        torch.testing.assert_close(values, want["inner"][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(groups, want["inner"][3], rtol=1e-5, atol=1e-6)
        assert torch.equal(got["relative"][1], want["relative"][1])
        torch.testing.assert_close(got["relative"][0], want["relative"][0], rtol=1e-5, atol=1e-6)


def test_split_helpers_partition_the_work():
    blocks = [distributed.block(7, r, 3) for r in range(3)]
    assert blocks == [(0, 2), (2, 4), (4, 7)]
    assert rank_store_path("/x/s", 1, 2) == "/x/s.parts/rank-00001-of-00002"
    batches = iter([1, 2])
    assert not distributed.active() and distributed.rank_batches(batches) is batches
    assert distributed.share(7) == 7 and distributed.share(None) is None


def _torchrun(*command: str, quiet: bool = True) -> str:
    """``torchrun --standalone --nproc-per-node 2 -m airtrace COMMAND --model test_distributed:task [--quiet]``."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "airtrace", *command, "--model", "test_distributed:task", *["--quiet"] * quiet],
                          cwd=HERE,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_merge_stores_equals_one_writer_and_checks_settings(tmp_path):
    rows = torch.arange(26 * 3, dtype=torch.float32).reshape(26, 3)
    ids = [f"e{i}" for i in range(26)]

    def write(path, lo, hi, fingerprint="fp"):
        with StoreWriter(path, fingerprint, 3, "float32", 4) as w:
            w.append(rows[lo:hi], ids[lo:hi])

    write(tmp_path / "one", 0, 26)
    write(tmp_path / "a", 0, 9)
    write(tmp_path / "b", 9, 26)
    merged = merge_stores([str(tmp_path / "a"), str(tmp_path / "b")], tmp_path / "merged", progress=False)
    assert merged.ids == ids and len(merged.shards) == 7
    for name in os.listdir(tmp_path / "one"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "merged" / name).read_bytes(), name
    write(tmp_path / "c", 0, 2, fingerprint="other")
    with pytest.raises(StoreError, match="fingerprint"):
        merge_stores([str(tmp_path / "a"), str(tmp_path / "c")], tmp_path / "bad", progress=False)
    with pytest.raises(ValueError, match="boom"), distributed.all_or_none("work"):
        raise ValueError("boom")


def test_cli_torchrun_featurize_and_score(single, tmp_path, monkeypatch):
    root, _ = single
    store, out, trace = tmp_path / "store", tmp_path / "scores.json", tmp_path / "trace.json"
    _torchrun("featurize", str(store), "--k-in", "3", "--k-out", "4", "--seed", "11", "--dtype", "float32",
              "--rows-per-shard", str(ROWS_PER_SHARD))
    _assert_same_store(store, root / "store")
    curv = str(root / "ekfac.safetensors")
    printed = _torchrun("score", str(store), "--curvature", curv, "--topk", str(TOPK), "--metric", "relative",
                        "--output", str(out), "--profile", str(trace), quiet=False).splitlines()
    assert printed.count("query_id\torder\trank\ttrain_id\tscore") == 1  # rank 0 alone prints
    assert trace.exists() and (tmp_path / "trace.rank1.json").exists()

    monkeypatch.chdir(HERE)
    single_out = tmp_path / "single.json"
    assert cli.main(["score", str(root / "store"), "--curvature", curv, "--topk", str(TOPK), "--metric", "relative",
                     "--output", str(single_out), "--model", "test_distributed:task", "--quiet"]) == 0
    got, want = json.loads(out.read_text()), json.loads(single_out.read_text())
    assert [r["train_id"] for r in got["topk"]] == [r["train_id"] for r in want["topk"]]
    torch.testing.assert_close(torch.tensor([r["score"] for r in got["topk"]]),
                               torch.tensor([r["score"] for r in want["topk"]]), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_cli_torchrun_fit(single, tmp_path):
    """``torchrun ... fit`` (EK-FAC from the store) saves the single-process factors (about 15 s)."""
    root, _ = single
    curv = tmp_path / "curv.safetensors"
    _torchrun("fit", str(root / "store"), "--out", str(curv))
    _assert_same_factors(load_file(curv), load_file(root / "ekfac.safetensors"))
