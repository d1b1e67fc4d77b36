"""Unlearning by datamodel matching (airtrace.unlearn, airtrace unlearn): the predicted outputs of a linear model worked
by hand, the matching step, resume after a kill, the command end to end, and bad input refused with nothing written."""

import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from airtrace import Attributor, cli
from airtrace.store import Store
from airtrace.unlearn import (MatchConfig, Targets, forget_rows, match_outputs, model_outputs, predict_outputs,
                              reference_batches)
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
    targets = predict_outputs(attributor, store, reference, forget, _logits, progress=False)
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


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    task, store, forget, reference, targets = _tiny_run(tmp_path)
    start = {k: v.clone() for k, v in task.model.state_dict().items()}
    config = MatchConfig(steps=9, lr=1e-2, checkpoint_every=2)
    match_outputs(task.model, reference, targets, _logits, config, progress=False)
    uninterrupted = {k: v.clone() for k, v in task.model.state_dict().items()}

    task.model.load_state_dict(start)
    checkpoint = str(tmp_path / "run.ckpt")
    calls = {"n": 0}
    original_step = torch.optim.Adam.step

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return original_step(self, *args, **kwargs)

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

    targets = predict_outputs(attributor, store_, reference, forget, minus_loss, progress=False)
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
    targets = predict_outputs(attributor, store_, reference, forget, _logits, progress=False)
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
