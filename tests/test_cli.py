"""CLI: featurize -> fit -> score round trip on a tiny factory, inspect, and exit codes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from airtrace import Attributor, Task, cli
from airtrace.capture import per_example_loss
from safetensors.torch import load_file

MODEL = "test_cli:tiny_task"
N_TRAIN, N_QUERY, BATCH = 20, 3, 6


def loss_fn(model, batch):
    return per_example_loss(model(batch["x"]), batch["y"])


def _batches(X, y, prefix):
    """(ids, batch) pairs of BATCH examples."""
    return [([f"{prefix}{i}" for i in range(s, min(s + BATCH, len(X)))],
             {"x": X[s: s + BATCH], "y": y[s: s + BATCH]}) for s in range(0, len(X), BATCH)]


def tiny_task(seed=0):
    """The factory: an MLP classifier on random data (same weights and data on every call)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    X, y = torch.randn(N_TRAIN + N_QUERY, 4), torch.randint(3, (N_TRAIN + N_QUERY,))
    return Task(model, loss_fn, _batches(X[:N_TRAIN], y[:N_TRAIN], "t"), _batches(X[N_TRAIN:], y[N_TRAIN:], "q"))


LOSS_CALLS: list[int] = []


def counting_task():
    """tiny_task whose loss records each batch's size in LOSS_CALLS."""
    task = tiny_task()

    def counting_loss(model, batch):
        LOSS_CALLS.append(batch["x"].shape[0])
        return loss_fn(model, batch)

    return Task(task.model, counting_loss, task.train, task.queries)


def other_task():
    """Another model (other weights), as a plain tuple."""
    task = tiny_task(seed=1)
    return task.model, task.loss_fn, task.train, task.queries


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A featurized store and fitted EK-FAC curvature, made through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    store, curv = str(root / "store"), str(root / "curv.safetensors")
    assert cli.main(["featurize", store, "--model", MODEL, "--k-in", "3", "--k-out", "2", "--seed", "7",
                     "--exact-budget", "0", "--dtype", "float32", "--rows-per-shard", "8", "--quiet"]) == 0
    assert cli.main(["fit", store, "--model", MODEL, "--out", curv, "--method", "ekfac", "--quiet"]) == 0
    return root, store, curv


def test_round_trip_equals_the_python_api(workdir, capsys):
    root, store, curv = workdir
    groups, output = root / "groups.json", root / "scores.json"
    groups.write_text(json.dumps([[0, 1, 2], [19], list(range(10, 20))]))
    capsys.readouterr()
    assert cli.main(["score", store, "--model", MODEL, "--curvature", curv, "--topk", "4", "--metric", "relative",
                     "--groups", str(groups), "--output", str(output)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "query_id\torder\trank\ttrain_id\tscore" and len(printed) == 1 + N_QUERY * 4 + 1
    result = json.loads(output.read_text())

    task = tiny_task()
    attributor = Attributor.from_store(task.model, store, loss_fn=loss_fn)
    attributor.load_curvature(curv)
    scores = attributor.score(task.queries, store, topk=4, metric="relative", groups=json.loads(groups.read_text()),
                              progress=False)
    assert result["curvature"] == "ekfac" and result["metric"] == "relative"
    assert [r["train_id"] for r in result["topk"]] == [r["train_id"] for r in scores.to_rows()]
    torch.testing.assert_close(torch.tensor(result["groups"]), scores.groups)
    assert printed[1].split("\t")[:4] == ["q0", "top", "1", scores.ids[0][0]]
    assert os.stat(output).st_mode & 0o777 == 0o644


def test_featurize_kfac_lets_fit_skip_its_model_pass(workdir, tmp_path):
    from airtrace.curvature import Curvature

    _, _, curv = workdir
    store, out = str(tmp_path / "store"), str(tmp_path / "curv.safetensors")
    LOSS_CALLS.clear()
    assert cli.main(["featurize", store, "--model", "test_cli:counting_task", "--k-in", "3", "--k-out", "2",
                     "--seed", "7", "--exact-budget", "0", "--dtype", "float32", "--rows-per-shard", "8", "--kfac", "--quiet"]) == 0
    assert sum(LOSS_CALLS) == N_TRAIN
    LOSS_CALLS.clear()
    assert cli.main(["fit", store, "--model", "test_cli:counting_task", "--out", out, "--method", "ekfac",
                     "--quiet"]) == 0
    assert LOSS_CALLS == []  # K-FAC sums from the featurize pass, eigenvalue correction from the store
    reference, got = Curvature.load(curv), Curvature.load(out)
    for name, inv in reference.inverses.items():
        for key, t in inv.tensors().items():
            g = got.inverses[name].tensors()[key]
            if key.startswith("eigvecs"):  # defined up to sign
                g, t = g.abs(), t.abs()
            torch.testing.assert_close(g, t, rtol=1e-6, atol=1e-9)


def test_score_without_curvature_is_identity(workdir, capsys):
    _, store, _ = workdir
    capsys.readouterr()
    assert cli.main(["score", store, "--model", MODEL, "--topk", "2", "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")  # --quiet: nothing but errors
    assert cli.main(["score", store, "--model", MODEL, "--topk", "2"]) == 0
    task = tiny_task()
    scores = Attributor.from_store(task.model, store, loss_fn=loss_fn, curvature="identity").score(
        task.queries, store, topk=2, progress=False)
    assert capsys.readouterr().out.splitlines()[1].split("\t")[3] == scores.ids[0][0]


def test_inspect_prints_the_manifest_summary_and_verifies(workdir, capsys):
    _, store, _ = workdir
    assert cli.main(["inspect", store, "--verify"]) == 0
    out = capsys.readouterr().out
    for text in ("rows         20 in 3 shards (8 rows per shard)", "dtype        float32", "width        12",
                 "layout       2 blocks", "  0  [2, 3]  6  (linear 6x5 +bias)", "fingerprint  fp2:", '"k_in": 3', '"seed": 7',
                 '"curvature": null', "verified     3 shards", '"exact_budget": 0'):
        assert text in out, text


def test_featurize_keeps_layers_within_the_exact_budget_unprojected(tmp_path):
    store = str(tmp_path / "store")
    # layer 0: 6 x (4 + bias) = 30 entries, projected to 2 x 3; layer 2: 3 x (6 + bias) = 21, kept whole
    assert cli.main(["featurize", store, "--model", MODEL, "--k-in", "3", "--k-out", "2", "--exact-budget", "21",
                     "--dtype", "float32", "--quiet"]) == 0
    assert Attributor.from_store(tiny_task().model, store, loss_fn=loss_fn).dims == {"0": (2, 3), "2": (3, 7)}


def test_runtime_errors_exit_1_with_the_message_and_no_traceback(workdir, tmp_path, capsys):
    _, store, _ = workdir
    assert cli.main(["score", store, "--model", "test_cli:other_task", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "fingerprint" in err and "Traceback" not in err

    copy = tmp_path / "copy"
    copy.mkdir()
    for name in os.listdir(store):
        data = (Path(store) / name).read_bytes()
        (copy / name).write_bytes(data[:-5] + bytes(5) if name == "shard-00001.safetensors" else data)
    assert cli.main(["inspect", str(copy), "--verify"]) == 1
    err = capsys.readouterr().err
    assert "shard-00001.safetensors" in err and "sha256" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["featurize", "--model", MODEL], "the following arguments are required: STORE"),
    (["score", "s", "--model", MODEL, "--topk", "0"], "expected a positive integer"),
    (["fit", "s", "--model", MODEL, "--out", "c", "--method", "newton"], "invalid choice"),
    (["featurize", "s", "--model", "no_such_module:f"], "cannot import 'no_such_module'"),
    (["featurize", "s", "--model", "test_cli"], "package.module:function"),
    (["featurize", "s", "--model", "test_cli:nothing"], "no callable 'nothing'"),
    (["inspect", "s", "--bogus"], "unrecognized arguments: --bogus"),
    (["featurize", "s", "--model", MODEL, "--dense", "8", "--exact-small"], "--exact-small applies to the factored"),
    (["featurize", "s", "--model", MODEL, "--dense", "8", "--exact-budget", "0"], "--exact-budget applies to the"),
    (["featurize", "s", "--model", MODEL, "--exact", "--exact-budget", "0"], "--exact keeps every layer unprojected"),
    (["featurize", "s", "--model", MODEL, "--dense", "8", "--kfac"], "--kfac needs the factored projection"),
    (["featurize", "s", "--model", MODEL, "--dense", "8", "--exact"], "--exact keeps every layer unprojected"),
    (["score", "s", "--model", MODEL, "--exact", "cg", "--curvature", "c"], "not allowed with argument"),
    (["score", "s", "--model", MODEL, "--exact", "cg", "--solver-tol", "2"], "expected a relative residual"),
])
def test_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_console_entry_point(workdir):
    _, store, _ = workdir
    ok = subprocess.run([sys.executable, "-m", "airtrace", "inspect", store], capture_output=True, text=True)
    assert ok.returncode == 0 and "rows         20" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "airtrace", "inspect"], capture_output=True, text=True)
    assert bad.returncode == 2 and "STORE" in bad.stderr


def test_exact_influence_through_the_cli(tmp_path, capsys):
    """featurize --exact + score --exact: CG (EK-FAC-preconditioned) equals the explicit dense inverse, the
    convergence is printed, and the solver flags without --exact are a usage error."""
    store = str(tmp_path / "store")
    assert cli.main(["featurize", store, "--model", MODEL, "--exact", "--dtype", "float32", "--quiet"]) == 0
    matrices = {}
    for solver in ("cg", "dense"):
        capsys.readouterr()
        path = tmp_path / f"{solver}.safetensors"
        assert cli.main(["score", store, "--model", MODEL, "--exact", solver, "--damping", "0.01",
                         "--solver-tol", "1e-5", "--full-matrix", str(path)]) == 0
        out = capsys.readouterr().out
        assert f"solve: {solver} (ggn), {N_QUERY} queries" in out
        matrices[solver] = load_file(str(path))["scores"]
    # CG stops at a relative residual of 1e-5; the scores are float32 inner products of its solution
    scale = float(matrices["dense"].abs().max())
    torch.testing.assert_close(matrices["cg"], matrices["dense"], rtol=1e-4, atol=1e-4 * scale)
    with pytest.raises(SystemExit):
        cli.main(["score", store, "--model", MODEL, "--damping", "0.01"])
    assert "--damping apply to exact influence: add --exact SOLVER" in capsys.readouterr().err


def test_ensemble_through_the_cli_equals_the_python_api(tmp_path, capsys):
    """Two models (tiny_task and other_task) each featurized and fitted by the CLI, combined by `ensemble`."""
    from airtrace.attribute import score_ensemble

    stores, curvs, members = [], [], []
    for name, factory in (("a", MODEL), ("b", "test_cli:other_task")):
        store, curv = str(tmp_path / name), str(tmp_path / f"{name}.safetensors")
        assert cli.main(["featurize", store, "--model", factory, "--k-in", "3", "--k-out", "2", "--dtype", "float32",
                         "--quiet"]) == 0
        assert cli.main(["fit", store, "--model", factory, "--out", curv, "--quiet"]) == 0
        stores.append(store)
        curvs.append(curv)
    output = tmp_path / "ensemble.json"
    assert cli.main(["ensemble", *stores, "--models", MODEL, "test_cli:other_task", "--curvatures", *curvs,
                     "--weights", "0.25", "0.75", "--topk", "3", "--output", str(output), "--quiet"]) == 0
    result = json.loads(output.read_text())
    for task, store, curv in zip((tiny_task(), tiny_task(seed=1)), stores, curvs):
        at = Attributor.from_store(task.model, store, loss_fn=task.loss_fn, curvature="identity")
        at.load_curvature(curv)
        members.append((at, store))
    expected = score_ensemble(members, tiny_task().queries, topk=3, weights=[0.25, 0.75], progress=False)
    assert [r["train_id"] for r in result["topk"]] == [i for row in expected.ids for i in row]
    assert [r["score"] for r in result["topk"]] == pytest.approx(expected.values.reshape(-1).tolist(), rel=1e-6)
    assert result["ensemble"] == 2 and result["weights"] == [0.25, 0.75]
    with pytest.raises(SystemExit):
        cli.main(["ensemble", *stores, "--models", MODEL])
    assert "--models takes one value per store (2), got 1" in capsys.readouterr().err
