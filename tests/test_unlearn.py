"""Unlearning by datamodel matching (airtrace.unlearn, airtrace unlearn): the predicted outputs of a linear model worked
by hand, the matching step, resume after a kill, the command end to end, and bad input refused with nothing written."""

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from airtrace import Attributor, cli
from airtrace.store import Store
from airtrace.eval import retrain
from airtrace.eval.subsets import SubsetPlan, sample_subsets
from airtrace.unlearn import (MatchConfig, ScaleWarning, Targets, fit_scale, forget_rows, match_outputs,
                              model_outputs, predict_outputs, reference_batches)
from test_cli import MODEL, tiny_task

F64 = torch.float64


def _squared_loss(model, batch):
    return 0.5 * (model(batch["x"])[:, 0] - batch["y"]) ** 2


def _logits(model, batch):
    return model(batch["x"])


def test_predicted_outputs_equal_the_linear_datamodel_by_hand(tmp_path):
    # f(x) = w·x with w = (1, 2); loss_i = ½ (w·x_i - y_i)², residual r_i = w·x_i - y_i, gradient r_i x_i.
    # The query "minus output" has gradient -x, so with identity curvature score(i, x) = -r_i (x·x_i), and the
    # prediction without F is f(x) - (1/n) Σ_F score(i, x) = w·x + (1/4) Σ_F r_i (x·x_i)   (n = 4).
    X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]], dtype=F64)
    y = torch.tensor([0.0, 1.0, 4.0, 1.0], dtype=F64)
    # residuals: 1 - 0 = 1, 2 - 1 = 1, 3 - 4 = -1, 0 - 1 = -1
    model = nn.Linear(2, 1, bias=False).to(F64)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]], dtype=F64))
    train = [([f"t{i}" for i in range(4)], {"x": X, "y": y})]
    attributor = Attributor(model, loss_fn=_squared_loss, curvature="identity")
    store = attributor.featurize(train, str(tmp_path / "s"), dtype="float32", progress=False)
    forget = forget_rows(store.ids, ["t1", "t3"])
    assert forget == [1, 3]
    reference = reference_batches(train, store, forget, retain=10)
    with pytest.warns(ScaleWarning, match="--scale-from"):  # the 1/n default is not silent
        targets = predict_outputs(attributor, store, reference, forget, _logits, progress=False)
    # Σ_F r_i x_i = 1 * (0, 1) + (-1) * (2, -1) = (-2, 2); prediction = w·x + (1/4) (-2, 2)·x
    # x0 = (1, 0): 1 - 0.5 = 0.5;  x1 = (0, 1): 2 + 0.5 = 2.5;  x2 = (1, 1): 3 + 0 = 3;  x3 = (2, -1): 0 - 1.5 = -1.5
    assert targets.ids == ["t0", "t1", "t2", "t3"]
    assert targets.scale == 0.25
    torch.testing.assert_close(targets.full[:, 0], torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=F64))
    # the store keeps float32 features: the scores are exact to float32 rounding
    torch.testing.assert_close(targets.predicted[:, 0], torch.tensor([0.5, 2.5, 3.0, -1.5], dtype=F64), rtol=0,
                               atol=1e-6)
    # scale= replaces 1/n
    doubled = predict_outputs(attributor, store, reference, forget, _logits, scale=0.5, progress=False)
    torch.testing.assert_close(doubled.predicted[:, 0], torch.tensor([0.0, 3.0, 3.0, -3.0], dtype=F64), rtol=0,
                               atol=1e-6)


def _linear_labels(masks, X, y, Xq, yq, w, scale, intercept):
    """Labels of the linear datamodel worked by hand: f(x) = w·x, loss ½ (w·x - y)², residual r = w·x - y; with
    identity curvature score(i, q) = ∇ℓ_qᵀ ∇ℓ_i = r_q r_i (x_q·x_i), and the label of subset j on query q is
    intercept_q - scale Σ_{i∉S_j} score(i, q)."""
    r, rq = X @ w - y, Xq @ w - yq
    scores = (rq[:, None] * r[None, :]) * (Xq @ X.T)  # (q, n)
    return intercept[None, :] - scale * (~masks).to(F64) @ scores.T  # (m, q)


def test_fit_scale_recovers_a_known_scale_on_a_linear_model(tmp_path):
    g = torch.Generator().manual_seed(0)
    n, q = 12, 4
    X, Xq = torch.randn(n, 3, generator=g, dtype=F64), torch.randn(q, 3, generator=g, dtype=F64)
    y, yq = torch.randn(n, generator=g, dtype=F64), torch.randn(q, generator=g, dtype=F64)
    w = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    model = nn.Linear(3, 1, bias=False).to(F64)
    with torch.no_grad():
        model.weight.copy_(w[None, :])
    # training ids are text (store row order = column order); query ids are the ints 0..q-1 given out of order,
    # so query id j is output column j wherever its batch puts it
    train = [([f"t{i}" for i in range(n)], {"x": X, "y": y})]
    shuffled = [2, 0, 3, 1]
    queries = [(shuffled, {"x": Xq[shuffled], "y": yq[shuffled]})]
    attributor = Attributor(model, loss_fn=_squared_loss, curvature="identity")
    store = attributor.featurize(train, str(tmp_path / "s"), dtype="float32", progress=False)
    plan = sample_subsets(n, 16, fraction=0.5, seed=3)
    intercept = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
    outputs = _linear_labels(plan.masks, X, y, Xq, yq, w, 0.07, intercept)
    fit = fit_scale(attributor, store, queries, outputs, plan.masks, progress=False)
    # the store keeps float32 features: exact to float32 rounding
    assert fit.scale == pytest.approx(0.07, rel=1e-5) and fit.per_n == pytest.approx(0.07 * n, rel=1e-5)
    assert fit.correlation == pytest.approx(1.0, abs=1e-6) and (fit.subsets, fit.queries) == (16, 4)
    # noise on the labels: the least-squares slope stays within its standard error, the correlation drops
    noise = 0.02 * torch.randn(outputs.shape, generator=g, dtype=F64)
    noisy = fit_scale(attributor, store, queries, outputs + noise, plan.masks, progress=False)
    G = (~plan.masks).to(F64) @ ((Xq @ w - yq)[:, None] * (X @ w - y)[None, :] * (Xq @ X.T)).T
    G = G - G.mean(dim=0)
    stderr = 0.02 / float(G.pow(2).sum()) ** 0.5
    assert abs(noisy.scale - 0.07) < 4 * stderr and 0 < noisy.correlation < 1
    # labels that fall where the attribution predicts a rise (another model's) are refused, not fitted
    with pytest.raises(ValueError, match="another model"):
        fit_scale(attributor, store, queries, 2 * intercept - outputs, plan.masks, source="L", progress=False)
    with pytest.raises(ValueError, match="L: the labels' subsets cover 11 training examples, the store 12"):
        fit_scale(attributor, store, queries, outputs, plan.masks[:, 1:], source="L", progress=False)
    with pytest.raises(ValueError, match="L: the labels measure 3 queries, the query batches hold 4"):
        fit_scale(attributor, store, queries, outputs[:, :3], plan.masks, source="L", progress=False)


def test_forget_ids_are_checked():
    ids = ["a", "b", 3]
    assert forget_rows(ids, ["3", "a"]) == [2, 0]
    for bad, message in (([], "no ids"), (["z"], "'z' is not a training id"), (["a", "a"], "listed twice"),
                         (["a", "b", "3"], "nothing would be retained")):
        with pytest.raises(ValueError, match=message):
            forget_rows(ids, bad)


def _tiny_run(tmp_path):
    """The test_cli task with a store, the reference set (forget t2, t5, t11 and 8 retained) and its targets."""
    task = tiny_task()
    attributor = Attributor(task.model, loss_fn=task.loss_fn, curvature="identity")
    store = attributor.featurize(task.train, str(tmp_path / "store"), dtype="float32", progress=False)
    forget = forget_rows(store.ids, ["t2", "t5", "t11"])
    reference = reference_batches(task.train, store, forget, retain=8, seed=1, batch_size=4)
    targets = predict_outputs(attributor, store, reference, forget, _logits, scale=1 / len(store), progress=False)
    return task, store, forget, reference, targets


def _distance(model, reference, targets):
    return float(((model_outputs(model, reference, _logits) - targets.predicted) ** 2).sum(dim=1).mean())


def test_matching_reduces_the_distance_to_the_targets(tmp_path):
    task, store, forget, reference, targets = _tiny_run(tmp_path)
    assert len(targets.ids) == 11 and {"t2", "t5", "t11"} <= set(targets.ids)
    assert float((targets.full - targets.predicted).abs().max()) > 0  # the forget set moves the outputs
    before = _distance(task.model, reference, targets)
    losses = match_outputs(task.model, reference, targets, _logits, MatchConfig(steps=60, lr=1e-2), progress=False)
    after = _distance(task.model, reference, targets)
    assert len(losses) == 60
    assert after < 0.1 * before, (before, after)


def _dying_step(step):
    """Adam's ``step`` that raises KeyboardInterrupt on its 6th call (a run killed after 5 steps), and its counter."""
    calls = {"n": 0}

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    return dying_step, calls


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    task, store, forget, reference, targets = _tiny_run(tmp_path)
    start = {k: v.clone() for k, v in task.model.state_dict().items()}
    config = MatchConfig(steps=9, lr=1e-2, checkpoint_every=2)
    match_outputs(task.model, reference, targets, _logits, config, progress=False)
    uninterrupted = {k: v.clone() for k, v in task.model.state_dict().items()}

    task.model.load_state_dict(start)
    checkpoint = str(tmp_path / "run.ckpt")
    original_step = torch.optim.Adam.step
    dying_step, calls = _dying_step(original_step)
    monkeypatch.setattr(torch.optim.Adam, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        match_outputs(task.model, reference, targets, _logits, config, checkpoint=checkpoint, progress=False)
    monkeypatch.setattr(torch.optim.Adam, "step", original_step)
    assert os.path.exists(checkpoint)  # written after steps 2 and 4

    task.model.load_state_dict(start)  # a fresh process loads the trained model again
    losses = match_outputs(task.model, reference, targets, _logits, config, checkpoint=checkpoint, progress=False)
    assert len(losses) == 5  # steps 5 .. 9
    for name, value in task.model.state_dict().items():
        assert torch.equal(value, uninterrupted[name]), name
    assert not os.path.exists(checkpoint)

    # a checkpoint of another run (other targets) is refused, not silently resumed
    task.model.load_state_dict(start)
    monkeypatch.setattr(torch.optim.Adam, "step", dying_step)
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        match_outputs(task.model, reference, targets, _logits, config, checkpoint=checkpoint, progress=False)
    monkeypatch.setattr(torch.optim.Adam, "step", original_step)
    other = Targets(targets.ids, targets.full, targets.predicted + 1, targets.scale)
    with pytest.raises(ValueError, match="belongs to another run"):
        match_outputs(task.model, reference, other, _logits, config, checkpoint=checkpoint, progress=False)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("unlearn")
    store = str(root / "store")
    assert cli.main(["featurize", store, "--model", MODEL, "--dtype", "float32", "--quiet"]) == 0
    return root, store


def test_cli_end_to_end_equals_the_python_api(store_dir, tmp_path, capsys):
    root, store = store_dir
    (tmp_path / "ids.txt").write_text("t2\nt5\n\nt11\n")
    out = str(tmp_path / "unlearned.safetensors")
    argv = ["unlearn", store, "--model", MODEL, "--forget", str(tmp_path / "ids.txt"), "--out", out,
            "--steps", "12", "--lr", "0.01", "--retain", "8", "--batch-size", "4", "--seed", "1"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "forget 3 of 20 training examples" in printed and f"wrote {out}" in printed
    assert not os.path.exists(out + ".ckpt")
    assert oct(os.stat(out).st_mode & 0o777) == "0o644"

    task = tiny_task()
    store_ = Store.open(store)
    attributor = Attributor.from_store(task.model, store_, loss_fn=task.loss_fn, curvature="identity")
    forget = forget_rows(store_.ids, ["t2", "t5", "t11"])
    reference = reference_batches(task.train, store_, forget, retain=8, seed=1, batch_size=4)

    def minus_loss(model, batch):
        return -task.loss_fn(model, batch)[:, None]

    targets = predict_outputs(attributor, store_, reference, forget, minus_loss, scale=1 / len(store_),
                              progress=False)
    match_outputs(task.model, reference, targets, minus_loss, MatchConfig(steps=12, lr=0.01, seed=1),
                  progress=False)
    written = load_file(out)
    assert set(written) == set(task.model.state_dict())
    for name, value in task.model.state_dict().items():
        torch.testing.assert_close(written[name], value, rtol=0, atol=0)
    assert not torch.equal(written["0.weight"], tiny_task().model.state_dict()["0.weight"])


@pytest.mark.parametrize("ids, other, status, message", [
    ("t2\nt99\n", False, 2, "'t99' is not a training id"),
    ("t2\nt2\n", False, 2, "listed twice"),
    ("\n\n", False, 2, "no ids in it"),
    ("\n".join(f"t{i}" for i in range(20)), False, 2, "nothing would be retained"),
    ("t2\n", True, 1, "fingerprint"),
])
def test_bad_input_exits_non_zero_with_nothing_written(store_dir, tmp_path, capsys, ids, other, status, message):
    root, store = store_dir
    (tmp_path / "ids.txt").write_text(ids)
    out = str(tmp_path / "unlearned.safetensors")
    argv = ["unlearn", store, "--model", "test_cli:other_task" if other else MODEL, "--forget",
            str(tmp_path / "ids.txt"), "--out", out, "--steps", "3", "--quiet"]
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == status
    assert message in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["ids.txt"]


def test_missing_forget_file_and_store_are_usage_errors(store_dir, tmp_path, capsys):
    root, store = store_dir
    for argv, message in ((["unlearn", store, "--model", MODEL, "--forget", str(tmp_path / "none.txt")],
                           "--forget"),
                          (["unlearn", str(tmp_path / "nostore"), "--model", MODEL, "--forget", __file__],
                           "no such folder")):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv + ["--out", str(tmp_path / "w.safetensors")])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "w.safetensors")


def _labels_dir(root, store, scale, masks):
    """A ground-truth folder (airtrace.eval.retrain) whose outputs follow the test_cli task's attribution with
    ``scale``: each 'model' is its subset's indices, 'measured' as 1 - scale × the group score of the rest."""
    task = tiny_task()
    store_ = Store.open(store)
    attributor = Attributor.from_store(task.model, store_, loss_fn=task.loss_fn, curvature="identity")
    scores = attributor.score(task.queries, store_, topk=1, matrix=True, progress=False).matrix.double()  # (q, n)

    def measure(indices):
        left_out = torch.ones(scores.shape[1], dtype=torch.bool)
        left_out[indices] = False
        return 1.0 - scale * scores[:, left_out].sum(dim=1)

    plan = SubsetPlan(masks, list(range(masks.shape[0])))
    retrain(plan, lambda indices, seed: indices, measure, root, progress=False)
    return str(root)


def test_cli_scale_from_labels_fits_the_scale_and_refuses_other_labels(store_dir, tmp_path, capsys):
    root, store = store_dir
    (tmp_path / "ids.txt").write_text("t4\nt9\n")
    out = str(tmp_path / "w.safetensors")
    masks = sample_subsets(20, 12, fraction=0.5, seed=1).masks
    argv = ["unlearn", store, "--model", MODEL, "--forget", str(tmp_path / "ids.txt"), "--out", out, "--steps", "2"]
    labels = _labels_dir(tmp_path / "labels", store, 0.3, masks)
    assert cli.main(argv + ["--scale-from", labels]) == 0
    captured = capsys.readouterr()
    assert f"scale 0.3 = 6 / n, fitted on {labels}" in captured.out and "correlation 1.000" in captured.out
    assert "warning" not in captured.err
    with safe_open(out, framework="pt") as f:
        assert float(f.metadata()["scale"]) == pytest.approx(0.3, rel=1e-5)
    os.remove(out)
    # no scale given: 1/n, with a warning that names the option
    assert cli.main(argv + ["--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "--scale-from LABELS" in err
    os.remove(out)
    # labels of another training set (19 examples) or of another model (outputs against the attribution)
    other_pool = tmp_path / "pool"
    retrain(SubsetPlan(masks[:, 1:], list(range(12))), lambda indices, seed: indices,
            lambda indices: torch.full((3,), float(indices.numel())), other_pool, progress=False)
    other_model = _labels_dir(tmp_path / "model", store, -0.3, masks)
    for folder, message in ((str(other_pool), "labels of another training set"),
                            (other_model, "labels of another model"), (str(tmp_path), "not a ground-truth file")):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv + ["--scale-from", folder, "--quiet"])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and f"--scale-from {folder}" in err and message in err, err
        assert not os.path.exists(out)


def test_cli_resumes_a_killed_run_without_recomputing_the_attribution(store_dir, tmp_path, monkeypatch, capsys):
    root, store = store_dir
    (tmp_path / "ids.txt").write_text("t3\nt8\n")
    argv = ["unlearn", store, "--model", MODEL, "--forget", str(tmp_path / "ids.txt"), "--steps", "9",
            "--checkpoint-every", "2", "--lr", "0.01", "--scale", "0.05", "--retain", "8", "--batch-size", "4",
            "--quiet"]
    whole = str(tmp_path / "whole.safetensors")
    assert cli.main(argv + ["--out", whole]) == 0
    out = str(tmp_path / "w.safetensors")
    dying_step, _ = _dying_step(torch.optim.Adam.step)
    monkeypatch.setattr(torch.optim.Adam, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv + ["--out", out])
    monkeypatch.undo()
    assert os.path.exists(out + ".ckpt") and not os.path.exists(out)

    def no_scoring(*args, **kwargs):
        raise AssertionError("the attribution ran again on resume")

    monkeypatch.setattr(Attributor, "score", no_scoring)
    # other settings than the checkpoint's: refused, not resumed with targets of another request
    assert cli.main([a if a != "0.05" else "0.07" for a in argv] + ["--out", out]) == 1
    assert "belongs to another run" in capsys.readouterr().err
    assert cli.main(argv[:-1] + ["--out", out]) == 0
    assert "resuming" in capsys.readouterr().out and not os.path.exists(out + ".ckpt")
    resumed, uninterrupted = load_file(out), load_file(whole)
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), name


def test_cli_outputs_function_and_a_bad_one(store_dir, tmp_path, capsys):
    root, store = store_dir
    (tmp_path / "ids.txt").write_text("t4\n")
    out = str(tmp_path / "w.safetensors")
    argv = ["unlearn", store, "--model", MODEL, "--forget", str(tmp_path / "ids.txt"), "--out", out, "--steps", "2",
            "--quiet"]
    assert cli.main(argv + ["--outputs", "test_unlearn:_logits"]) == 0
    task = tiny_task()
    store_ = Store.open(store)
    attributor = Attributor.from_store(task.model, store_, loss_fn=task.loss_fn, curvature="identity")
    forget = forget_rows(store_.ids, ["t4"])
    reference = reference_batches(task.train, store_, forget, retain=512, seed=0, batch_size=64)
    targets = predict_outputs(attributor, store_, reference, forget, _logits, scale=1 / len(store_), progress=False)
    assert targets.predicted.shape == (20, 3)  # every row: 1 forget + the 19 retained; three logits each
    match_outputs(task.model, reference, targets, _logits, MatchConfig(steps=2), progress=False)
    written = load_file(out)
    for name, value in task.model.state_dict().items():
        torch.testing.assert_close(written[name], value, rtol=0, atol=0)
    os.remove(out)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv + ["--outputs", "test_unlearn:no_such_function"])
    assert exc.value.code == 2 and "--outputs" in capsys.readouterr().err
    assert not os.path.exists(out)
