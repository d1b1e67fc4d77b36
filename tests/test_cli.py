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
                     "--dtype", "float32", "--rows-per-shard", "8", "--quiet"]) == 0
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
                     "--seed", "7", "--dtype", "float32", "--rows-per-shard", "8", "--kfac", "--quiet"]) == 0
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
                 '"curvature": null', "verified     3 shards"):
        assert text in out, text


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
    (["featurize", "s", "--model", MODEL, "--dense", "8", "--kfac"], "--kfac needs the factored projection"),
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
