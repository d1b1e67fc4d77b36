"""Training-time capture: a plain loop and a Hugging Face Trainer capture features at chosen steps with their
learning rates; checkpoint-weighted scores equal TracIn-CP computed from single-example gradients."""

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from airtrace import Attributor, CheckpointCapture, per_example_loss, score_checkpoints, trainer_callback
from airtrace.attribute.training import checkpoints

F64 = torch.float64


def loss_fn(model, batch):
    return per_example_loss(model(batch[0]), batch[1])


def test_plain_loop_capture_gives_tracin_cp(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(10, 3, dtype=F64), torch.randint(0, 2, (10,))
    Xq, yq = torch.randn(2, 3, dtype=F64), torch.tensor([0, 1])
    loader = DataLoader(TensorDataset(X, y), batch_size=5)
    exact = dict(k_in=8, k_out=8, seed=0)  # wider than every layer: the features are the full gradients
    at = Attributor(model, loss_fn=loss_fn, projection=exact, curvature="identity")
    capture = CheckpointCapture(at, loader, tmp_path / "ckpt", steps=[2, 4], dtype="float32")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    def flat_grads(x, t):
        model.zero_grad(set_to_none=True)
        per_example_loss(model(x), t).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    expected = torch.zeros(2, 10, dtype=F64)
    step = 0
    for _ in range(2):
        for xb, yb in loader:
            optimizer.zero_grad()
            per_example_loss(model(xb), yb).mean().backward()
            optimizer.step()
            scheduler.step()
            step += 1
            lr = optimizer.param_groups[0]["lr"]
            if step in (2, 4):  # TracIn-CP by hand: lr x per-example gradient products at this checkpoint
                G = torch.stack([flat_grads(X[i: i + 1], y[i: i + 1]) for i in range(10)])
                Q = torch.stack([flat_grads(Xq[i: i + 1], yq[i: i + 1]) for i in range(2)])
                expected += lr * Q @ G.T
            capture.step(step, lr)
    found = checkpoints(tmp_path / "ckpt")
    assert [(c.step, c.learning_rate) for c in found] == [(2, 0.125), (4, 0.5 ** 5)]
    final = [p.detach().clone() for p in model.parameters()]
    scores = score_checkpoints(at, [(["a", "b"], (Xq, yq))], tmp_path / "ckpt", topk=3, order="both", progress=False)
    assert all(torch.equal(p, f) for p, f in zip(model.parameters(), final))  # weights restored
    torch.testing.assert_close(scores.matrix, expected, rtol=1e-5, atol=1e-7)  # float32 store
    assert scores.indices.tolist() == expected.topk(3, dim=1).indices.tolist()
    assert scores.bottom_indices.tolist() == (-expected).topk(3, dim=1).indices.tolist()
    with pytest.raises(ValueError, match="exactly one of"):
        CheckpointCapture(at, loader, tmp_path / "x")


def test_hugging_face_trainer_callback_records_steps_and_learning_rates(tmp_path):
    transformers = pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(1)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=30, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    rows = [[int(t) for t in torch.randint(0, 30, (6,))] for _ in range(8)]
    train = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})

    def lm_loss(model, batch):
        return per_example_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"], "causal_lm")

    with pytest.warns(UserWarning, match="not attributed"):
        at = Attributor(model, "transformer.h.*", loss_fn=lm_loss, curvature="identity")
    capture = CheckpointCapture(at, train, tmp_path / "ckpt", steps=[2, 4])
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4,
                                          max_steps=4, learning_rate=1e-3, lr_scheduler_type="linear",
                                          report_to=[], save_strategy="no", logging_strategy="no",
                                          use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train, callbacks=[trainer_callback(capture)])
    trainer.train()
    found = json.loads((tmp_path / "ckpt" / "checkpoints.json").read_text())
    assert [c["step"] for c in found] == [2, 4]
    assert [c["learning_rate"] for c in found] == pytest.approx([1e-3 * 2 / 4, 0.0])  # linear decay to 0
    stores = [checkpoints(tmp_path / "ckpt")[i].store for i in range(2)]
    from airtrace import Store

    a, b = (Store.open(tmp_path / "ckpt" / s) for s in stores)
    assert a.ids == b.ids == list(range(8)) and a.fingerprint != b.fingerprint  # the weights moved between them
