"""Self-calibration: the chosen settings are the grid's best, an Attributor built from the file reproduces their LDS,
the labels are reused without retraining, and bad input is refused."""

import json

import pytest
import torch

from airtrace.attribute.calibration import Calibration
from airtrace.eval import load_ground_truth, metrics
from airtrace.eval.calibrate import calibrate

BUDGET, FOLDS = 12, 3
GRID = dict(sizes=(2, 3), curvatures=("ekfac", "fisher"), factors=(0.01, 1.0), metrics_=("inner", "cosine"))
N, Q, D, OUT, L2 = 60, 10, 5, 3, 0.1


class Ridge:
    """Multi-output ridge regression on random data, solved in closed form (fast, deterministic retraining)."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(N + Q, D, generator=g, dtype=torch.float64)
        y = x @ torch.randn(D, OUT, generator=g, dtype=torch.float64) + torch.randn(N + Q, OUT, generator=g,
                                                                                    dtype=torch.float64)
        self.x, self.y, self.xq, self.yq = x[:N], y[:N], x[N:], y[N:]

    def loss_fn(self, model, batch):
        return (model(batch["x"]) - batch["y"]).square().sum(1)

    def train_fn(self, indices, seed):
        x = torch.cat([self.x[indices], torch.ones(len(indices), 1, dtype=torch.float64)], dim=1)
        theta = torch.linalg.solve(x.T @ x / len(indices) + L2 * torch.eye(D + 1, dtype=torch.float64),
                                   x.T @ self.y[indices] / len(indices))
        model = torch.nn.Sequential(torch.nn.Linear(D, OUT, dtype=torch.float64))
        with torch.no_grad():
            model[0].weight.copy_(theta[:D].T)
            model[0].bias.copy_(theta[D])
        return model

    def measure_fn(self, model):
        with torch.no_grad():
            return -(model(self.xq) - self.yq).square().sum(1)

    def batches(self, x, y):
        return [(list(range(s, min(s + 16, len(x)))), {"x": x[s: s + 16], "y": y[s: s + 16]})
                for s in range(0, len(x), 16)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    task = Ridge()
    model = task.train_fn(torch.arange(N), 0)
    out = tmp_path_factory.mktemp("calibrate")
    cal = calibrate(model, task.loss_fn, task.batches(task.x, task.y), task.batches(task.xq, task.yq), task.train_fn,
                    task.measure_fn, out, budget=BUDGET, folds=FOLDS, bias=True, progress=False, **GRID)
    return task, model, out, cal


def test_the_choice_is_the_best_of_the_grid_and_the_file_reads_back(run):
    _, _, out, cal = run
    assert len(cal.grid) == 2 * 2 * 3 * 2  # sizes x curvatures x (2 factors + auto) x metrics
    best = max(cal.grid, key=lambda c: c["lds"])
    s = cal.settings
    assert (s["projection"]["k_in"], s["curvature"], s["damping"], s["metric"]) == (
        best["k"], best["curvature"], best["damping"], best["metric"])
    assert cal.lds["in_sample"] == best["lds"] and cal.lds["folds"] == FOLDS and cal.lds["subsets"] == BUDGET
    assert cal.lds["ci"][0] <= cal.lds["mean"] <= cal.lds["ci"][1]
    assert Calibration.load(out / "calibration.json") == cal
    assert len(list((out / "subsets").glob("subset-*.safetensors"))) == BUDGET  # one file per retrained subset


def test_an_attributor_from_the_file_reproduces_the_chosen_lds(run, tmp_path):
    task, model, out, cal = run
    at = Calibration.load(out / "calibration.json").attributor(model, loss_fn=task.loss_fn)
    assert at.curvature_method == cal.settings["curvature"] and at.projection["k_in"] == cal.settings["projection"]["k_in"]
    store = at.featurize(task.batches(task.x, task.y), tmp_path / "store", dtype="float32", progress=False)
    at.fit(task.batches(task.x, task.y), store=store, progress=False)
    at.score(task.batches(task.xq, task.yq), store, topk=1, metric=cal.metric, full_matrix_path=tmp_path / "m.safetensors",
             progress=False)
    from safetensors.torch import load_file

    outputs, plan, _ = load_ground_truth(out / "subsets")
    lds = metrics.lds(load_file(str(tmp_path / "m.safetensors"))["scores"], plan.masks, outputs, bootstrap=0).mean
    # the grid scores in float64, the store holds float32 features: rank ties of the subset sums may move
    assert lds == pytest.approx(cal.lds["in_sample"], abs=2e-3)


def test_labels_are_reused_without_retraining(run, tmp_path):
    task, model, out, cal = run
    again = calibrate(model, task.loss_fn, task.batches(task.x, task.y), task.batches(task.xq, task.yq), None, None, tmp_path,
                      labels=out / "subsets", folds=FOLDS, bias=True, progress=False, **GRID)
    assert again.settings == cal.settings and again.lds == cal.lds and again.grid == cal.grid


def shuffled(x, y):
    """Batches of 16 in a permuted example order, ids the positions (as batches grouped by length)."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1)).tolist()
    return [(order[s: s + 16], {"x": x[order[s: s + 16]], "y": y[order[s: s + 16]]}) for s in range(0, len(x), 16)]


def test_batches_out_of_id_order_give_the_same_choice(run, tmp_path):
    task, model, out, cal = run
    again = calibrate(model, task.loss_fn, shuffled(task.x, task.y), shuffled(task.xq, task.yq), None, None, tmp_path,
                      labels=out / "subsets", folds=FOLDS, bias=True, progress=False, **GRID)
    assert again.settings == cal.settings
    assert [c["lds"] for c in again.grid] == pytest.approx([c["lds"] for c in cal.grid], abs=1e-9)


def test_bad_input_is_refused(run, tmp_path):
    task, model, out, _ = run
    args = (model, task.loss_fn, task.batches(task.x, task.y), task.batches(task.xq, task.yq))
    with pytest.raises(ValueError, match="needs train_fn and measure_fn"):
        calibrate(*args, None, None, tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"folds must be an int in \[2, 12\]"):
        calibrate(*args, None, None, tmp_path, labels=out / "subsets", folds=1, progress=False, **GRID)
    with pytest.raises(ValueError, match="curvatures must be of"):
        calibrate(*args, None, None, tmp_path, labels=out / "subsets", curvatures=("newton",), progress=False)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="bad.json: not a calibration file"):
        Calibration.load(bad)


def ridge_task():
    """The CLI factory: the ridge model trained on every example, its training and query batches."""
    from airtrace import Task

    task = Ridge()
    return Task(task.train_fn(torch.arange(N), 0), task.loss_fn, task.batches(task.x, task.y),
                task.batches(task.xq, task.yq))


def test_the_cli_calibrates_from_labels_and_featurize_fit_score_read_the_file(run, tmp_path, capsys):
    from airtrace import cli

    _, _, out, cal = run
    factory = "test_calibrate:ridge_task"
    grid = ["--sizes", "2", "3", "--curvatures", "ekfac", "fisher", "--factors", "0.01", "1.0",
            "--metrics", "inner", "cosine"]
    assert cli.main(["calibrate", "--model", factory, "--labels", str(out / "subsets"), "--out", str(tmp_path),
                     "--folds", str(FOLDS), "--bias", "--quiet", *grid]) == 0
    printed = capsys.readouterr().out
    assert f"held-out LDS {cal.lds['mean']:.4f}" in printed and "24 candidates" in printed
    path = str(tmp_path / "calibration.json")
    assert Calibration.load(path).settings == cal.settings
    store, curv = str(tmp_path / "store"), str(tmp_path / "c.safetensors")
    assert cli.main(["featurize", store, "--model", factory, "--calibration", path, "--dtype", "float32",
                     "--quiet"]) == 0
    assert cli.main(["fit", store, "--model", factory, "--calibration", path, "--out", curv, "--quiet"]) == 0
    assert cli.main(["score", store, "--model", factory, "--curvature", curv, "--calibration", path,
                     "--output", str(tmp_path / "s.json"), "--quiet"]) == 0
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["metric"] == cal.settings["metric"] and result["curvature"] == cal.settings["curvature"]
    with pytest.raises(SystemExit):
        cli.main(["fit", store, "--model", factory, "--calibration", path, "--out", curv, "--damping", "0.1"])
    assert "--calibration sets the curvature and damping" in capsys.readouterr().err


def test_labels_with_other_columns_first_are_read_through_columns(run, tmp_path):
    """A label set that measures 3 other examples before the queries (as AirRep's dev pairs) calibrates the same."""
    from airtrace.eval import retrain

    task, model, out, cal = run
    outputs, plan, _ = load_ground_truth(out / "subsets")
    extra = torch.randn(plan.m, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    rows = {tuple(plan.masks[j].nonzero().flatten().tolist()): j for j in range(plan.m)}

    def measure_fn(j):
        return torch.cat([extra[j], outputs[j]])

    retrain(plan, lambda indices, seed: rows[tuple(indices.tolist())], measure_fn, tmp_path / "labels", progress=False)
    with pytest.raises(ValueError, match="the labels measure 13 queries, the query batches hold 10"):
        calibrate(model, task.loss_fn, task.batches(task.x, task.y), task.batches(task.xq, task.yq), None, None,
                  tmp_path / "c1", labels=tmp_path / "labels", folds=FOLDS, bias=True, progress=False, **GRID)
    again = calibrate(model, task.loss_fn, task.batches(task.x, task.y), task.batches(task.xq, task.yq), None, None,
                      tmp_path / "c2", labels=tmp_path / "labels", columns=slice(3, None), folds=FOLDS, bias=True,
                      progress=False, **GRID)
    assert again.settings == cal.settings and again.lds == cal.lds
