"""The chatterbot causal-LM benchmark task: tokenizer, per-example losses, deterministic training, LDS end to end.

Default tests use a reduced task (a few seconds of training per model); the
full-size evaluation is ``slow``:
``cd /tmp && /work/main/.venv/bin/python -m pytest -q -m slow /work/main/tests/test_eval_lm.py``.
"""

import math

import pytest
import torch

from airtrace.data import format_example
from airtrace.eval.tasks import lm_eval
from airtrace.eval.tasks.lm import GPT, LMConfig, LMTask, WordTokenizer, answer_losses, lm_config, words
from airtrace.eval.tasks.lm import _mean_answer_loss

SMALL = lm_config("tiny", n_train=96, n_query=16, epochs=4, batch_size=8)
"""For unit tests: a one-block model trained on at most 96 pairs in well under a second."""
REDUCED = lm_config("tiny")
"""For the reduced end-to-end LDS run."""
REDUCED_METHODS = {
    "logra-identity": dict(projection=dict(k_in=8, k_out=8, seed=0), curvature="identity"),
    "logra-ekfac": dict(projection=dict(k_in=8, k_out=8, seed=0), curvature="ekfac"),
    "trak-dense": dict(projection=dict(type="dense", k=512, seed=0), curvature="identity"),
}


@pytest.fixture(scope="module")
def task() -> LMTask:
    return LMTask(SMALL)


@pytest.fixture(scope="module")
def trained(task) -> GPT:
    return task.train_fn(torch.arange(task.n_train), 0)


# --------------------------------------------------------------------------- tokenizer and config


def test_tokenizer_vocabulary_order_and_unknowns():
    tokenizer = WordTokenizer.build(["b a a", "c a b!", "Question: b"], min_count=2)
    assert tokenizer.vocab == ["<pad>", "<unk>", "a", "b"]  # a: 3, b: 3 (ties by text); c, !, question, : once
    assert words("Hi, it's 2 o'clock!") == ["hi", ",", "it", "'", "s", "2", "o", "'", "clock", "!"]
    assert tokenizer("A b, c!") == [2, 3, 1, 1, 1]


def test_task_split_is_deterministic_and_disjoint(task):
    again = LMTask(SMALL)
    assert [p["id"] for p in again.train] == [p["id"] for p in task.train]
    assert [p["id"] for p in again.queries] == [p["id"] for p in task.queries]
    assert again.tokenizer.vocab == task.tokenizer.vocab
    texts = {(p["question"], p["answer"]) for p in task.train}
    assert len(texts) == task.n_train == 96 and len(task.queries) == 16
    assert not texts & {(p["question"], p["answer"]) for p in task.queries}
    other = LMTask(lm_config("tiny", n_train=96, n_query=16, split_seed=1))
    assert [p["id"] for p in other.queries] != [p["id"] for p in task.queries]


@pytest.mark.parametrize("overrides, match", [
    (dict(d_model=30, n_head=4), "d_model"),
    (dict(epochs=0), "epochs"),
    (dict(lr=0.0), "lr"),
])
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        LMConfig(**overrides)


def test_bad_size_field_and_corpus_raise():
    with pytest.raises(ValueError, match="size"):
        lm_config("huge")
    with pytest.raises(ValueError, match="n_layers"):
        lm_config(n_layers=3)
    with pytest.raises(ValueError, match="n_train"):
        LMTask(lm_config("tiny", n_train=5000))


# --------------------------------------------------------------------------- losses


def _manual_losses(task: LMTask, model: GPT, pairs) -> tuple[list[float], list[float]]:
    """Summed and mean answer-token NLL of every pair, one unpadded float64 sequence at a time."""
    model64 = GPT(len(task.tokenizer), task.config.max_length, task.config.d_model, task.config.n_layer,
                  task.config.n_head, task.config.mlp_ratio).double()
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    model64.eval()
    sums, means = [], []
    half = task.config.max_length // 2
    for pair in pairs:
        prompt, response = format_example(pair["question"], pair["answer"])
        prompt_ids = task.tokenizer(prompt)[-half:]
        ids = (prompt_ids + task.tokenizer(response))[: task.config.max_length]
        with torch.no_grad():
            logp = torch.log_softmax(model64(torch.tensor([ids]))[0], dim=-1)
        nll = [-logp[t - 1, ids[t]].item() for t in range(len(prompt_ids), len(ids))]
        sums.append(math.fsum(nll))
        means.append(math.fsum(nll) / len(nll))
    return sums, means


def test_example_losses_equal_manual_float64_computation(task, trained):
    pairs = task.queries + task.train[:20]  # mixed lengths: padding in every batch
    sums, means = _manual_losses(task, trained, pairs)
    got_mean = task.example_losses(trained, pairs)
    got_sum = task.example_losses(trained, pairs, reduction="sum")
    assert got_mean.dtype == torch.float64 and got_mean.shape == (len(pairs),)
    torch.testing.assert_close(got_sum, torch.tensor(sums, dtype=torch.float64), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_mean, torch.tensor(means, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(task.measure_fn(trained), -got_mean[: len(task.queries)])
    assert got_mean.std() > 0.1  # a trained model: the pairs are not all fit alike
    with pytest.raises(ValueError, match="reduction"):
        task.example_losses(trained, pairs, reduction="max")


def test_loss_fn_batches_and_training_objective_agree_with_example_losses(task, trained):
    sums = task.example_losses(trained, task.train, reduction="sum")
    seen = torch.zeros(task.n_train, dtype=torch.bool)
    for ids, batch in task.train_batches(batch_size=16):
        torch.testing.assert_close(task.loss_fn(trained, batch).double(), sums[ids], rtol=1e-5, atol=1e-4)
        seen[ids] = True
    assert seen.all()
    # the training objective: summed answer-token loss over the batch / its answer tokens
    batch = task.encode(task.train[:24])
    losses, counts = answer_losses(trained, batch)
    with torch.no_grad():
        objective = _mean_answer_loss(trained, batch)
    torch.testing.assert_close(objective.double(), sums[:24].sum() / counts.sum(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- training


def test_training_is_deterministic_under_the_seed(task):
    rows = torch.arange(0, task.n_train, 2)
    first, again = task.train_fn(rows, 5), task.train_fn(rows, 5)
    for (name, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    unseeded = LMTask(lm_config("tiny", n_train=96, n_query=16, epochs=4, batch_size=8, init_seed=None,
                                 order_seed=None))
    x, y = unseeded.train_fn(rows, 5), unseeded.train_fn(rows, 6)
    assert not torch.equal(x.lm_head.weight, y.lm_head.weight)
    torch.testing.assert_close(unseeded.train_fn(rows, 6).lm_head.weight, y.lm_head.weight, rtol=0, atol=0)


def test_training_fits_its_subset_better_than_the_rest(task):
    rows = torch.arange(task.n_train // 2)
    model = task.train_fn(rows, 0)
    losses = task.example_losses(model, task.train)
    untrained = task.example_losses(task.new_model(0), task.train[:8])
    assert losses[rows].mean() < losses[task.n_train // 2 :].mean() - 0.3
    assert losses.mean() < untrained.mean() - 1.0  # far below the ~log V of the initial weights
    assert abs(untrained.mean() - math.log(len(task.tokenizer))) < 0.5


def test_train_fn_rejects_bad_indices(task):
    for bad in ([0, 0, 1], [task.n_train], [-1], []):
        with pytest.raises(ValueError, match="indices"):
            task.train_fn(torch.tensor(bad, dtype=torch.long), 0)


# --------------------------------------------------------------------------- attribution, end to end


def test_reduced_lds_is_clearly_positive(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRTRACE_CACHE", str(tmp_path / "cache"))
    results = lm_eval.evaluate(REDUCED, REDUCED_METHODS, m=10, bootstrap=200, progress=False)
    assert [r.method for r in results] == list(REDUCED_METHODS)
    for result in results:
        assert result.scores.shape == (REDUCED.n_query, REDUCED.n_train)
        assert result.lds.mean > 0.1, (result.method, result.lds.mean)
        assert result.lds.ci[0] > 0, (result.method, result.lds.ci)
    # the ground truth and the full model are cached: a second call retrains nothing
    folder = next((tmp_path / "cache" / "eval").iterdir())
    assert (folder / lm_eval.FULL_MODEL_FILE).is_file()
    assert (folder / "lds-m10-f0.5-s0" / "ground_truth.safetensors").is_file()
    task = LMTask(REDUCED)
    outputs, plan = lm_eval.ground_truth(task, 10, progress=False)
    again = lm_eval.evaluate(REDUCED, {"logra-identity": REDUCED_METHODS["logra-identity"]}, m=10, bootstrap=0,
                             progress=False)
    torch.testing.assert_close(again[0].scores, results[0].scores)
    assert outputs.shape == (10, REDUCED.n_query) and plan.masks.sum(1).eq(REDUCED.n_train // 2).all()


@pytest.mark.slow
def test_full_size_lds(tmp_path):
    results = lm_eval.evaluate(lm_config(), m=32, progress=False, workdir=tmp_path)
    for result in results:
        assert result.lds.ci[0] > 0, (result.method, result.lds.mean, result.lds.ci)
