"""``--profile``: Chrome traces with one named range per pipeline stage; the per-stage breakdown."""

import json

import pytest
import torch
from torch import nn

from airtrace import Task, cli
from airtrace.capture import per_example_loss
from airtrace.profiling import STAGES, format_stage_times, load_trace, stage, stage_ranges, stage_times

MODEL = "test_profile:task"
N_TRAIN, BATCH = 12, 4


def loss_fn(model, batch):
    return per_example_loss(model(batch["x"]), batch["y"])


def task():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    X, y = torch.randn(N_TRAIN + 2, 4), torch.randint(3, (N_TRAIN + 2,))
    batches = [([f"t{i}" for i in range(s, s + BATCH)], {"x": X[s: s + BATCH], "y": y[s: s + BATCH]})
               for s in range(0, N_TRAIN, BATCH)]
    return Task(model, loss_fn, batches, [(["q0", "q1"], {"x": X[N_TRAIN:], "y": y[N_TRAIN:]})])


def _names(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, _, _, _ in stage_ranges(load_trace(path)):
        counts[name] = counts.get(name, 0) + 1
    return counts


def test_cli_profile_traces_name_every_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(__import__("os").path.dirname(__file__))
    store, curv = str(tmp_path / "store"), str(tmp_path / "curv.safetensors")
    traces = {c: tmp_path / f"{c}.json" for c in ("featurize", "fit", "score")}
    common = ["--model", MODEL, "--quiet"]
    assert cli.main(["featurize", store, "--rows-per-shard", "5", "--profile", str(traces["featurize"]), *common]) == 0
    assert cli.main(["fit", store, "--out", curv, "--profile", str(traces["fit"]), *common]) == 0
    assert cli.main(["score", store, "--curvature", curv, "--metric", "relative", "--profile", str(traces["score"]),
                     *common]) == 0
    featurize, fit, score = (_names(traces[c]) for c in ("featurize", "fit", "score"))
    batches = N_TRAIN // BATCH
    # every forward/backward is one capture range; each of the 2 layers projects once per capture
    assert featurize["capture"] == batches and featurize["project"] == 2 * batches
    assert featurize["store_write"] == batches
    assert fit["capture"] == batches and fit["fit_update"] == batches + 3  # K-FAC batches + EK-FAC over 3 shards
    assert fit["store_read"] == 3 + 1  # 3 shards, and the final next() that ends the stream
    assert score["capture"] == 1 and score["precondition"] == 1 + 3  # queries, then self-influence per shard
    assert score["score"] == 3
    assert json.loads(traces["score"].read_text())["traceEvents"]


def test_profile_into_a_missing_folder_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["featurize", str(tmp_path / "s"), "--model", MODEL, "--profile", str(tmp_path / "no" / "t.json")])
    assert exc.value.code == 2 and "--profile" in capsys.readouterr().err


def test_stage_times_hand_computed():
    events = [
        {"ph": "X", "name": "airtrace.capture", "ts": 0, "dur": 100, "tid": 1},
        {"ph": "X", "name": "airtrace.project", "ts": 10, "dur": 20, "tid": 1},
        {"ph": "X", "name": "aten::mm", "ts": 12, "dur": 5, "tid": 1},
        {"ph": "X", "name": "airtrace.project", "ts": 40, "dur": 10, "tid": 1},
        {"ph": "X", "name": "airtrace.store_write", "ts": 100, "dur": 30, "tid": 1},
        {"ph": "X", "name": "airtrace.score", "ts": 50, "dur": 7, "tid": 2},  # another thread: not nested
    ]
    times = stage_times({"traceEvents": events})
    assert list(times) == ["capture", "project", "store_write", "score"]
    assert (times["capture"].total_ms, times["capture"].exclusive_ms) == (0.1, 0.07)
    assert (times["project"].calls, times["project"].exclusive_ms) == (2, 0.03)
    assert times["store_write"].exclusive_ms == 0.03 and times["score"].exclusive_ms == 0.007
    assert "capture" in format_stage_times(times) and "51.1%" in format_stage_times(times)  # 70 of 137 µs
    assert "50.0%" in format_stage_times(times, wall_ms=0.14)  # 70 of 140 µs


def test_unknown_stage_and_bad_trace_raise(tmp_path):
    with pytest.raises(ValueError, match="unknown profiling stage"):
        stage("nope")
    bad = tmp_path / "t.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="t.json"):
        load_trace(bad)
    assert set(STAGES) >= {"capture", "project", "store_write", "precondition", "score"}
