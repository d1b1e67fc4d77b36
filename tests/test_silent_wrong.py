"""No silent wrong answer in the pipeline and the command line: every input that used to give a wrong result with
exit 0 now gives the right one or a clear error naming the problem, one section per kind (store identity, curvature
records, checksums, changed data, low precision, the command line); the kernels' part is tests/test_numerics.py."""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from airtrace import Attributor, Task, cli
from airtrace.capture import per_example_loss
from airtrace.curvature import Curvature
from airtrace.store import ManifestError, SidecarError, Store, StoreError, StoreWriter, model_fingerprint
from airtrace.store.sidecars import kfac_sidecar
from airtrace.util import checked_file

MODEL = "test_silent_wrong:task"
N_TRAIN, BATCH = 12, 4


def _loss(model, batch):
    return per_example_loss(model(batch["x"]), batch["y"])


def _model(seed: int = 0) -> nn.Module:
    """An MLP with BatchNorm (running statistics are buffers) and a 64 x 40 weight, wider than 1024 entries."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 40), nn.BatchNorm1d(40), nn.Tanh(), nn.Linear(40, 64), nn.Tanh(),
                         nn.Linear(64, 3)).eval()


def _data(seed: int = 0, n: int = N_TRAIN, prefix: str = "t") -> list:
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(n, 5, generator=g), torch.randint(3, (n,), generator=g)
    return [([f"{prefix}{i}" for i in range(s, min(s + BATCH, n))], {"x": X[s: s + BATCH], "y": y[s: s + BATCH]})
            for s in range(0, n, BATCH)]


def _attributor(model: nn.Module, curvature: str = "identity") -> Attributor:
    return Attributor(model, ["0", "3", "5"], loss_fn=_loss, projection=dict(k_in=3, k_out=2, seed=1, exact_budget=0),
                      curvature=curvature)


def task() -> Task:
    """The command line's factory: the model and data above, 3 queries."""
    return Task(_model(), _loss, _data(), _data(seed=9, n=3, prefix="q"))


def empty_task() -> Task:
    """The same with an empty training set."""
    return Task(_model(), _loss, [], _data(seed=9, n=3, prefix="q"))


def _files(path: Path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- store identity


def test_the_fingerprint_changes_with_every_weight_byte_buffer_and_module():
    model = _model()
    base = model_fingerprint(model)
    assert model_fingerprint(copy.deepcopy(model)) == base  # the same weights and modules: the same fingerprint
    variants = {}

    def variant(name, change):
        m = copy.deepcopy(model)
        with torch.no_grad():
            change(m)
        variants[name] = model_fingerprint(m)

    variant("a weight entry between the entries a sample of 1024 would read", lambda m: m[3].weight.view(-1)[1].add_(1e-3))
    variant("BatchNorm running mean", lambda m: m[1].running_mean[7].add_(0.5))
    variant("BatchNorm eps", lambda m: setattr(m[1], "eps", 1e-3))
    variant("activation class", lambda m: m.__setitem__(2, nn.ReLU()))
    variant("GELU", lambda m: m.__setitem__(2, nn.GELU()))
    variant("GELU tanh approximation", lambda m: m.__setitem__(2, nn.GELU(approximate="tanh")))
    variant("dtype", lambda m: m.double())
    assert base not in variants.values() and len(set(variants.values())) == len(variants), variants
    with pytest.raises(ValueError, match=r"model parameter '0.weight' is on the meta device"):
        model_fingerprint(copy.deepcopy(model).to("meta"))


@pytest.mark.parametrize("change", ["running_mean", "activation"])
def test_a_store_is_refused_once_the_model_changed_anywhere(tmp_path, change):
    model, train = _model(), _data()
    store = _attributor(model).featurize(train, tmp_path / "s", progress=False)
    with torch.no_grad():
        if change == "running_mean":
            model[1].running_mean.add_(0.1)  # the per-example gradients change, no parameter does
        else:
            model[4] = nn.ReLU()
    with pytest.raises(StoreError, match=rf"{store.path}: the store holds features of model fingerprint"):
        _attributor(model).score(train[:1], store, progress=False)


def test_a_store_of_the_old_format_must_be_featurized_again(tmp_path):
    model, train = _model(), _data()
    path = tmp_path / "s"
    _attributor(model).featurize(train, path, progress=False)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(version=1, fingerprint="sha256:" + "ab" * 32)  # what an older airtrace wrote
    del manifest["checksum"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    before = _files(path)
    for call in (lambda: Store.open(path), lambda: _attributor(model).featurize(train, path, progress=False),
                 lambda: _attributor(model).score(train[:1], path, progress=False)):
        with pytest.raises(ManifestError, match=r"written by an older airtrace \(store format 1\).*needs re-featurizing"):
            call()
    assert _files(path) == before


# ----------------------------------------------------------------------------- curvature records


@pytest.fixture
def fitted(tmp_path):
    """A store of _model() on _data() and its EK-FAC curvature file."""
    model, train = _model(), _data()
    at = _attributor(model, "ekfac")
    store = at.featurize(train, tmp_path / "s", dtype="float32", progress=False)
    at.fit(train, tmp_path / "curv.safetensors", store=store, progress=False)
    return tmp_path, store, tmp_path / "curv.safetensors"


def test_a_curvature_is_refused_against_another_model_or_store(fitted):
    root, store, curv = fitted
    loaded = Curvature.load(curv)
    assert loaded.fingerprint == model_fingerprint(_model()) and loaded.store_key == store.content_key()
    other = _model(seed=1)
    other_store = _attributor(other).featurize(_data(), root / "other-model", dtype="float32", progress=False)
    at = _attributor(other)
    at.load_curvature(curv)
    with pytest.raises(ValueError, match=rf"{curv}: refused, it was fitted for model fingerprint 'fp2:\w+', this "
                                         r"model's is 'fp2:\w+'.*Fix: fit the curvature"):
        at.score(_data(n=2), other_store, progress=False)
    with pytest.raises(ValueError, match=rf"{curv}: refused, it was fitted for model fingerprint"):
        at.self_influence(other_store, progress=False)
    other_data = _attributor(_model()).featurize(_data(seed=5), root / "other-data", dtype="float32", progress=False)
    at = _attributor(_model())
    at.load_curvature(curv)
    with pytest.raises(ValueError, match=rf"{curv}: refused, it was fitted on the store with content key "
                                         rf"'{store.content_key()}', the store {other_data.path} has "
                                         rf"'{other_data.content_key()}'"):
        at.score(_data(n=2), other_data, metric="relative", progress=False)
    scores = at.score(_data(n=2), store, topk=3, progress=False)  # its own model and store
    assert scores.indices.ge(0).all()


def test_a_changed_or_old_curvature_file_is_refused(fitted, tmp_path):
    _, _, curv = fitted
    data = bytearray(curv.read_bytes())
    data[-3] ^= 0x10  # a bit of the last factor
    changed = tmp_path / "changed.safetensors"
    changed.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"changed.safetensors: checksum mismatch"):
        Curvature.load(changed)
    tensors, record = checked_file.load_checked(curv, "airtrace.curvature")
    old = tmp_path / "old.safetensors"
    checked_file.save_checked(tensors, old, "airtrace.curvature", {**record, "format": 1})
    with pytest.raises(ValueError, match=r"old.safetensors: curvature format 1.*Fix: fit it again"):
        Curvature.load(old)


# ----------------------------------------------------------------------------- checksums


@pytest.mark.parametrize("edit", ["drop the last shard", "rename an id"])
def test_an_edited_manifest_fails_open_verify_and_scoring(tmp_path, edit, capsys):
    model, train = _model(), _data()
    path = tmp_path / "s"
    _attributor(model).featurize(train, path, rows_per_shard=4, progress=False)
    manifest = json.loads((path / "manifest.json").read_text())
    if edit == "drop the last shard":
        manifest["shards"].pop()
        manifest["total_rows"] = manifest["shards"][-1]["row_end"]
    else:
        manifest["shards"][0]["ids"][1] = "someone-else"
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2))
    message = r"manifest.json: checksum mismatch: the manifest changed after airtrace wrote it"
    with pytest.raises(ManifestError, match=message):
        _attributor(model).score(train[:1], path, progress=False)
    capsys.readouterr()
    assert cli.main(["inspect", str(path), "--verify"]) == 1
    assert "checksum mismatch" in capsys.readouterr().err


def test_sidecars_are_checksummed_and_a_bad_one_is_recomputed(tmp_path, caplog, capsys):
    model, train = _model(), _data()
    at = _attributor(model, "kfac")
    store = at.featurize(train, tmp_path / "s", dtype="float32", progress=False)
    sums = Path(kfac_sidecar(store))
    expected = _attributor(model, "kfac").fit(train, store=store, progress=False).precondition(
        {"5": torch.ones(1, 2, 3)})["5"]
    _flip_last_byte(sums)
    with caplog.at_level(logging.WARNING, logger="airtrace"):
        got = _attributor(model, "kfac").fit(train, store=store, progress=False)
    assert "checksum mismatch" in caplog.text
    torch.testing.assert_close(got.precondition({"5": torch.ones(1, 2, 3)})["5"], expected)  # its own K-FAC pass
    with pytest.raises(SidecarError, match=rf"sidecar-kfac-sums-\w+\.safetensors: checksum mismatch"):
        store.verify()
    capsys.readouterr()
    assert cli.main(["inspect", store.path, "--verify"]) == 1
    assert "checksum mismatch" in capsys.readouterr().err
    sums.unlink()

    at = _attributor(model)
    first = at.score(train[:1], store, topk=N_TRAIN, metric="relative", progress=False)
    (cache,) = Path(store.path).glob("sidecar-self_influence-*.safetensors")
    _flip_last_byte(cache)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="airtrace"):
        again = at.score(train[:1], store, topk=N_TRAIN, metric="relative", progress=False)
    assert "checksum mismatch" in caplog.text
    assert torch.equal(again.values, first.values) and torch.equal(again.indices, first.indices)
    store.verify()  # the recomputed cache replaced the bad one


# ----------------------------------------------------------------------------- other data under the same ids


def _changed(batches: list, batch: int, row: int) -> list:
    out = [(ids, dict(b)) for ids, b in batches]
    out[batch][1]["x"] = out[batch][1]["x"].clone()
    out[batch][1]["x"][row, 0] += 1.0
    return out


def test_a_resume_with_other_data_under_the_same_ids_is_refused(tmp_path):
    model, train = _model(), _data()
    path = tmp_path / "s"
    poisoned = _changed(train, 2, 0)
    poisoned[2][1]["x"][0, 0] = float("nan")  # featurize stops here: the first two shards are committed
    with pytest.raises(ValueError, match="non-finite"):
        _attributor(model).featurize(poisoned, path, rows_per_shard=4, progress=False)
    before = _files(path)
    with pytest.raises(StoreError, match=rf"{path}: example id 't5' holds other data than when it was featurized"):
        _attributor(model).featurize(_changed(train, 1, 1), path, rows_per_shard=4, progress=False)
    assert _files(path) == before
    _attributor(model).featurize(train, path, rows_per_shard=4, progress=False)  # the same data resumes
    reference = _attributor(model).featurize(train, tmp_path / "ref", rows_per_shard=4, progress=False)
    assert _files(path) == _files(Path(reference.path))


def test_featurizing_other_data_into_a_finished_store_is_refused(tmp_path):
    model, train = _model(), _data()
    store = _attributor(model).featurize(train, tmp_path / "s", progress=False)
    assert _attributor(model).featurize(train, tmp_path / "s", progress=False).path == store.path  # a no-op
    labels = [(ids, {**b, "y": (b["y"] + 1) % 3}) for ids, b in train]
    with pytest.raises(StoreError, match=r"example id 't0' holds other data.*Fix: featurize into a new directory, "
                                         r"or pass overwrite=True"):
        _attributor(model).featurize(labels, tmp_path / "s", progress=False)


# ----------------------------------------------------------------------------- low-precision stores


def test_a_float16_store_refuses_features_that_overflow_it(tmp_path):
    w = StoreWriter(tmp_path / "s", "fp2:" + "ab" * 32, 3, "float16", 4)
    big = torch.tensor([[1.0, 2.0, 3.0], [7e4, 0.0, 1.0]])  # finite in float32, inf in float16
    with pytest.raises(StoreError, match=r"features row 1 of this batch \(example id 'b'\) overflows the store dtype "
                                         r"float16 \(largest finite value 65504\).*Fix: write the store as float32"):
        w.append(big, ["a", "b"])
    assert w.rows_written == 0
    w.abort()
    model, train = _model(), _data()
    with torch.no_grad():
        model[5].weight.mul_(1e5)  # gradients beyond 65504
    with pytest.raises(StoreError, match=r"overflows the store dtype float16"):
        _attributor(model).featurize(train, tmp_path / "lm", dtype="float16", progress=False)
    store = _attributor(model).featurize(train, tmp_path / "ok", dtype="bfloat16", progress=False)
    scores = _attributor(model).score(train[:1], store, topk=N_TRAIN, progress=False)
    assert scores.indices.ge(0).all() and scores.values.isfinite().all()  # every row, none dropped


# ----------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    assert cli.main(["featurize", str(root / "store"), "--model", MODEL, "--k-in", "3", "--k-out", "2",
                     "--dtype", "float32", "--quiet"]) == 0
    return root


def test_cli_topk_is_clamped_to_the_store_before_any_allocation(cli_store, capsys, monkeypatch):
    import airtrace.scoring

    asked = []
    real = airtrace.scoring.empty_topk
    monkeypatch.setattr(airtrace.scoring, "empty_topk", lambda q, k, *a: asked.append(k) or real(q, k, *a))
    capsys.readouterr()
    assert cli.main(["score", str(cli_store / "store"), "--model", MODEL, "--topk", "1000000000"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + 3 * N_TRAIN  # the table (--quiet would print none)
    assert asked == [N_TRAIN]


def test_cli_fit_on_a_full_disk_is_one_line_and_keeps_the_old_file(cli_store, capsys, monkeypatch):
    out = cli_store / "curv.safetensors"
    assert cli.main(["fit", str(cli_store / "store"), "--model", MODEL, "--out", str(out), "--quiet"]) == 0
    before = out.read_bytes()

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 10)  # a partial temp file
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checked_file, "save_file", full_disk)
    capsys.readouterr()
    assert cli.main(["fit", str(cli_store / "store"), "--model", MODEL, "--out", str(out), "--method", "fisher",
                     "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err == f"airtrace fit: error: could not write {out}: No space left on device\n"
    assert out.read_bytes() == before and not list(cli_store.glob("*.tmp"))


@pytest.mark.parametrize("groups, entry", [([[0, 1], [0.5]], r"groups\[1\]\[0\] is 0.5"),
                                           ([[True, 2]], r"groups\[0\]\[0\] is True"),
                                           ([[1.0]], r"groups\[0\]\[0\] is 1.0")])
def test_cli_groups_must_be_integer_rows(cli_store, capsys, groups, entry):
    path = cli_store / "groups.json"
    path.write_text(json.dumps(groups))
    with pytest.raises(SystemExit) as info:
        cli.main(["score", str(cli_store / "store"), "--model", MODEL, "--groups", str(path), "--quiet"])
    assert info.value.code == 2
    assert f"--groups {path}: " in capsys.readouterr().err
    attributor = Attributor.from_store(_model(), cli_store / "store", loss_fn=_loss, curvature="identity")
    with pytest.raises(ValueError, match=entry + ", not an integer train row index"):
        attributor.score(_data(n=2), cli_store / "store", groups=groups, progress=False)


@pytest.mark.parametrize("metric", ["inner", "cosine", "relative"])
def test_an_empty_training_set_gives_an_empty_result_for_every_metric(tmp_path, capsys, metric):
    store = str(tmp_path / "store")
    assert cli.main(["featurize", store, "--model", "test_silent_wrong:empty_task", "--quiet"]) == 0
    capsys.readouterr()
    output = tmp_path / "scores.json"
    assert cli.main(["score", store, "--model", "test_silent_wrong:empty_task", "--metric", metric,
                     "--output", str(output), "--full-matrix", str(tmp_path / "full.safetensors"), "--quiet"]) == 0
    assert capsys.readouterr().out == ""  # --quiet: nothing but errors
    assert json.loads(output.read_text())["topk"] == []
    at = Attributor.from_store(_model(), store, loss_fn=_loss, curvature="identity")
    scores = at.score(_data(n=2), store, topk=3, metric=metric, groups=[[]], progress=False)
    assert scores.to_rows() == [] and scores.groups.tolist() == [[0.0], [0.0]]
    assert at.self_influence(store, progress=False).shape == (0,)


def test_cli_fixes_name_flags_and_python_fixes_name_arguments(tmp_path, capsys):
    store = str(tmp_path / "store")
    assert cli.main(["featurize", store, "--model", MODEL, "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["featurize", store, "--model", MODEL, "--quiet", "--dtype", "float32"]) == 1
    err = capsys.readouterr().err
    assert "Fix: write to a new directory, or pass --overwrite to replace the store." in err and "=True" not in err
    with pytest.raises(StoreError, match=r"Fix: write to a new directory, or pass overwrite=True to replace"):
        _attributor(_model()).featurize(_data(), store, dtype="float32", progress=False)
    manifest = Path(store) / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"t0"', '"t12"'))
    assert cli.main(["score", store, "--model", MODEL, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "Fix: restore the original manifest.json, or run airtrace featurize again with --overwrite." in err
    assert "=True" not in err


def test_cli_out_of_memory_is_one_line(cli_store, capsys, monkeypatch):
    for error in (MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                              "12000000000 bytes.\nmore detail")):
        def fail(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(Attributor, "score", fail)
        capsys.readouterr()
        assert cli.main(["score", str(cli_store / "store"), "--model", MODEL, "--quiet"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("airtrace score: error: out of memory (") and err.count("\n") == 1


@pytest.mark.parametrize("mib", [256, 450])
def test_cli_under_a_low_ulimit_v_fails_with_one_line_never_an_abort(cli_store, mib):
    """Too little address space to load torch: torch itself would abort (std::bad_alloc, OpenBLAS, thread-local
    storage); the command says so in one line before it loads torch."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (mib << 20, mib << 20))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "airtrace", "score", str(cli_store / "store"), "--model", MODEL,
                           "--quiet"], preexec_fn=limit, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 1, done.stderr
    assert done.stderr == (f"airtrace: error: out of memory: the address space is limited to {mib} MiB (ulimit -v), "
                           "too little to load torch and run the kernels. Fix: raise the limit (ulimit -v) or "
                           "remove it.\n")

