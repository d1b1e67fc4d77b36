"""AirRep: pooling, labels, RankNet loss, gradient caching, encoder persistence, text format, CLI.

Everything here runs on a tiny randomly initialised BERT (no MiniLM weights needed).
"""

import json
import math

import pytest
import torch

from airtrace import cli
from airtrace.airrep import evaluate
from airtrace.airrep.encoder import INIT_SCALE, Encoder, format_text
from airtrace.airrep.objective import normalize_labels, ranknet_loss
from airtrace.airrep.pooling import group_scores, groups_to_csr, masks_to_csr, pool
from airtrace.airrep.train import TrainConfig, _encoders, cached_step, subset_scores, train
from airtrace.eval import metrics

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "question", ":", "answer", "hello", "world", "how", "are",
         "you", "?", ".", "fine", "what", "is", "a", "robot", "i", "am", "not", "sure", "yes", "no"]
TEXTS = [format_text(q, a) for q, a in [
    ("hello", "hello world"), ("how are you?", "i am fine."), ("what is a robot?", "a robot is a robot."),
    ("are you a robot?", "yes"), ("is it fine?", "not sure."), ("what are you?", "i am a robot."),
    ("hello?", "no"), ("you are fine", "yes i am"), ("what?", "hello world ."), ("sure?", "i am sure"),
]]


def tiny_encoder(seed=0, max_tokens=32, dtype=torch.float32) -> Encoder:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=64)
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)})
    return Encoder(BertModel(config), tokenizer, max_tokens=max_tokens, seed=seed).to(dtype)


def brute_pool(values):
    """sum_i softmax(|s|)_i s_i of a list of floats, in float64 via math (0 for an empty list)."""
    if not values:
        return 0.0
    top = max(abs(v) for v in values)
    w = [math.exp(abs(v) - top) for v in values]
    return sum(wi * v for wi, v in zip(w, values)) / sum(w)


# --------------------------------------------------------------------------- pooling


def test_pool_matches_brute_force_float64():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, 7, generator=g, dtype=torch.float64) * 4
    mask = torch.rand(3, 5, 7, generator=g) < 0.6
    mask[0, 0] = False                      # empty group
    mask[0, 1] = False
    mask[0, 1, 3] = True                    # singleton
    out = pool(s, mask)
    for b in range(3):
        for k in range(5):
            expected = brute_pool(s[b, k][mask[b, k]].tolist())
            assert out[b, k].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert out[0, 0].item() == 0.0
    assert out[0, 1].item() == s[0, 1, 3].item()
    summed = pool(s, mask, "sum")
    assert torch.allclose(summed, (s * mask).sum(-1), rtol=0, atol=1e-12)


def test_pool_is_stable_for_large_scores():
    s = torch.tensor([[1000.0, -1001.0], [1e30, 3.0]], dtype=torch.float64)
    out = pool(s)
    assert torch.isfinite(out).all()
    e = math.exp(-1.0)
    assert out[0].item() == pytest.approx((1000.0 * e - 1001.0) / (1.0 + e), rel=1e-14)
    assert out[1].item() == 1e30
    x = s.clone().requires_grad_(True)
    pool(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[1].tolist() == [1.0, 0.0]   # all weight on the 1e30 member


def test_group_scores_match_pool_and_sum():
    g = torch.Generator().manual_seed(1)
    queries = torch.randn(4, 6, generator=g, dtype=torch.float64)
    train_emb = torch.randn(9, 6, generator=g, dtype=torch.float64)
    groups = [[0, 1, 2], [], [5], [2, 3, 4, 5, 6, 7, 8], [8, 0]]
    offsets, members = groups_to_csr(groups, 9)
    s = queries @ train_emb.T
    for pooling in ("attention", "sum"):
        out = group_scores(queries, train_emb, offsets, members, pooling=pooling)
        for gi, group in enumerate(groups):
            expected = pool(s[:, group], pooling=pooling) if group else torch.zeros(4, dtype=torch.float64)
            assert torch.allclose(out[:, gi], expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="outside"):
        groups_to_csr([[9]], 9)


def test_masks_to_csr_and_subset_scores():
    masks = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    offsets, members = masks_to_csr(masks)
    assert offsets.tolist() == [0, 3, 3, 4] and members.tolist() == [0, 2, 3, 1]
    g = torch.Generator().manual_seed(2)
    dev, train_emb = torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g,
                                                                                       dtype=torch.float64)
    f = subset_scores(dev, train_emb, masks, "attention")
    expected = group_scores(dev, train_emb, offsets, members)
    assert torch.allclose(f, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- labels and loss


def test_normalize_labels_by_hand():
    losses = torch.tensor([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]], dtype=torch.float64)
    sigma = math.sqrt(2 / 3)
    y = normalize_labels(losses)
    assert y[:, 0].tolist() == pytest.approx([1 / sigma, 0.0, -1 / sigma], rel=1e-12)
    assert y[:, 1].tolist() == [0.0, 0.0, 0.0]           # sigma 0 -> 1, all at the mean
    outlier = torch.zeros(1000, 1, dtype=torch.float64)
    outlier[0] = 100.0                                  # (0.1 - 100) / 3.16 = -31.6 -> clipped
    y = normalize_labels(outlier)
    assert y[0, 0].item() == -10.0 and y[1, 0].item() == pytest.approx(0.1 / math.sqrt(9.99), rel=1e-9)


def test_ranknet_loss_by_hand():
    f = torch.tensor([[1.0, 0.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([[0.5, 0.0, 0.05]], dtype=torch.float64)
    # kept pairs: (0, 1) gap 0.5, (0, 2) gap 0.45; (2, 1) gap 0.05 <= 0.1 is dropped
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    expected = (0.5 * softplus(-1.0) + 0.45 * softplus(1.0)) / 2
    assert ranknet_loss(f, y).item() == pytest.approx(expected, rel=1e-12)
    capped = ranknet_loss(torch.tensor([[0.0, 3.0]]), torch.tensor([[7.0, 0.0]]))
    assert capped.item() == pytest.approx(5.0 * softplus(3.0), rel=1e-6)
    flat = torch.zeros(2, 3, requires_grad=True)
    none = ranknet_loss(flat, torch.full((2, 3), 0.05))
    assert none.item() == 0.0
    none.backward()
    assert flat.grad is not None and flat.grad.abs().sum() == 0


# --------------------------------------------------------------------------- gradient caching


@pytest.mark.parametrize("pooling", ["attention", "sum"])
def test_gradient_caching_equals_plain_backward(pooling):
    encoder = tiny_encoder(dtype=torch.float64)
    train_texts, dev_texts = TEXTS[:7], TEXTS[7:]
    encode_dev, encode_train, params = _encoders(encoder, train_texts, dev_texts, TrainConfig(trainable="all"), False)
    masks = torch.tensor([[1, 1, 0, 1, 0, 0, 1], [0, 1, 1, 0, 1, 1, 0], [1, 0, 0, 0, 0, 1, 1],
                          [0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    masks[3, 4] = True
    dev_rows = torch.tensor([0, 2, 1])
    labels = torch.tensor([[1.0, -0.5, 0.3, 2.0], [0.0, 0.2, -1.0, 0.4], [-2.0, 1.5, 0.0, 0.0]], dtype=torch.float64)

    encoder.zero_grad()
    loss = cached_step(encode_dev, encode_train, dev_rows, masks, labels, pooling=pooling, chunk=2)
    cached = {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}

    encoder.zero_grad()
    used = masks.any(dim=0).nonzero().flatten()
    f = subset_scores(encode_dev(dev_rows), encode_train(used), masks[:, used], pooling)
    plain_loss = ranknet_loss(f, labels)
    plain_loss.backward()
    plain = {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}

    assert loss == pytest.approx(plain_loss.item(), rel=1e-12)
    assert cached.keys() == plain.keys() and len(plain) > 10
    assert any(g.abs().max() > 0 for name, g in plain.items() if name.startswith("backbone.encoder"))
    for name in plain:
        assert torch.allclose(cached[name], plain[name], rtol=1e-10, atol=1e-12), name


def test_training_lowers_the_ranking_loss():
    encoder = tiny_encoder(seed=3)
    g = torch.Generator().manual_seed(0)
    train_texts, dev_texts = TEXTS[:6], TEXTS[6:]
    masks = torch.rand(12, 6, generator=g) < 0.5
    masks[:, 0] |= ~masks.any(dim=1)
    with torch.no_grad():
        E = encoder.embed(train_texts)
        D = encoder.embed(dev_texts)
    target = torch.randn(4, 8, generator=g)            # labels of a planted "ideal" dev representation
    outputs = subset_scores(target, E @ torch.randn(8, 8, generator=g), masks, "sum").T.double()
    config = TrainConfig(steps=60, lr=5e-2, warmup=0.05, dev_batch=4, subset_batch=12, trainable="projector")
    def lds():                                         # the evaluation's sign: higher output = subset helps
        f = subset_scores(encoder.embed(dev_texts), encoder.embed(train_texts), masks, config.pooling)
        return evaluate.lds_of_predictions(f.T.double(), outputs, bootstrap=0).mean

    before = lds()
    losses = train(encoder, train_texts, dev_texts, masks, outputs, config, progress=False)
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert not torch.equal(encoder.embed(dev_texts), D)
    assert lds() > max(before, 0) + 0.3                # a flipped label sign would lower the loss, not raise this
    with pytest.raises(ValueError, match="dev_outputs"):
        train(encoder, train_texts, dev_texts, masks, outputs[:, :2], config, progress=False)


# --------------------------------------------------------------------------- encoder


def test_save_load_round_trip(tmp_path):
    encoder = tiny_encoder(seed=5, max_tokens=16)
    encoder.init_scale = 0.7
    with torch.no_grad():
        encoder.projector.weight.add_(0.25)
    folder = encoder.save(tmp_path / "enc")
    loaded = Encoder.load(folder)
    assert loaded.max_tokens == 16 and loaded.seed == 5 and loaded.init_scale == 0.7
    a, b = encoder.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(encoder.embed(TEXTS), loaded.embed(TEXTS))
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Encoder.load(folder)


def test_projector_init_is_seeded():
    a, b, c = tiny_encoder(seed=1), tiny_encoder(seed=2), Encoder(tiny_encoder().backbone, None, seed=1)
    assert torch.equal(a.projector.weight, c.projector.weight)
    assert not torch.equal(a.projector.weight, b.projector.weight)
    assert (a.projector.bias == 0).all()


def test_projector_init_scale():
    backbone = tiny_encoder().backbone
    default, unit = Encoder(backbone, None, seed=4), Encoder(backbone, None, seed=4, init_scale=1.0)
    expected = torch.randn(8, 8, generator=torch.Generator().manual_seed(4)) / 8 ** 0.5
    assert torch.allclose(unit.projector.weight, expected, rtol=1e-6, atol=0)
    assert default.init_scale == INIT_SCALE == 0.3
    assert torch.allclose(default.projector.weight, INIT_SCALE * expected, rtol=1e-6, atol=0)
    for bad in (0, -1.0, True, "1"):
        with pytest.raises(ValueError, match="init_scale"):
            Encoder(backbone, None, init_scale=bad)


def test_text_format_and_truncation():
    assert format_text("how  are\tyou?", "fine.") == "Question: how are you?\nAnswer: fine."
    long_question = " ".join(f"w{i}" for i in range(300))
    text = format_text(long_question, "a")
    assert text == "Question: " + " ".join(f"w{i}" for i in range(256)) + "\nAnswer: a"
    encoder = tiny_encoder(max_tokens=8)
    tokens = encoder.tokenize([format_text("hello world hello world hello world", "fine"), "hello"])
    assert tokens["input_ids"].shape == (2, 8)
    assert tokens["input_ids"][0].tolist() == [2, 5, 6, 8, 9, 8, 9, 3]      # [CLS] question : hello world ... [SEP]
    assert tokens["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="max_tokens"):
        Encoder(encoder.backbone, encoder.tokenizer, max_tokens=1)


def test_embed_is_the_batched_forward_in_any_order():
    encoder = tiny_encoder(dtype=torch.float64)
    with torch.no_grad():
        one_by_one = torch.cat([encoder.encode([t]) for t in TEXTS])
    assert torch.allclose(encoder.embed(TEXTS, batch_size=3), one_by_one, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- evaluation


def test_sum_pooling_lds_equals_additive_lds():
    g = torch.Generator().manual_seed(4)
    queries, train_emb = torch.randn(5, 3, generator=g), torch.randn(12, 3, generator=g)
    masks = torch.rand(9, 12, generator=g) < 0.5
    outputs = torch.randn(9, 5, generator=g, dtype=torch.float64)
    ours = evaluate.airrep_lds(queries, train_emb, masks, outputs, pooling="sum", bootstrap=50)
    theirs = metrics.lds((queries @ train_emb.T).double(), masks, outputs, bootstrap=50)
    assert torch.allclose(ours.per_query, theirs.per_query, atol=1e-6) and ours.mean == pytest.approx(theirs.mean)
    perfect = evaluate.lds_of_predictions(outputs * 2 + 1, outputs, bootstrap=0)
    assert perfect.mean == pytest.approx(1.0)


# --------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("argv", [
    ["airrep"],
    ["airrep", "score", "--encoder", "/nonexistent-airrep", "--train", "/nonexistent.jsonl",
     "--queries", "/nonexistent.jsonl"],
    ["airrep", "train", "--out", "/tmp/x", "--subsets", "10", "--holdout", "9"],
    ["airrep", "label", "--fraction", "1.5"],
    ["airrep", "train", "--out", "/tmp/x", "--pooling", "max"],
])
def test_cli_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2


def test_cli_embed_and_score(tmp_path, capsys):
    folder = tiny_encoder(seed=7).save(tmp_path / "enc")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"id": f"p{i}", "question": q, "answer": a}) for i, (q, a) in
                               enumerate([("hello", "world"), ("how are you?", "fine"), ("what?", "a robot")])))
    out = tmp_path / "emb.safetensors"
    assert cli.main(["airrep", "embed", "--encoder", str(folder), "--data", str(pairs), "--out", str(out),
                     "--quiet"]) == 0
    groups = tmp_path / "groups.json"
    groups.write_text("[[0, 1], [2], []]")
    capsys.readouterr()
    assert cli.main(["airrep", "score", "--encoder", str(folder), "--train", str(out), "--queries", str(pairs),
                     "--topk", "2", "--groups", str(groups), "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    E = Encoder.load(folder).embed([format_text("hello", "world"), format_text("how are you?", "fine"),
                                    format_text("what?", "a robot")])
    s = E @ E.T
    best = s[0].argmax().item()
    assert lines[1].split("\t")[:3] == ["p0", "1", f"p{best}"]
    assert float(lines[1].split("\t")[3]) == pytest.approx(s[0, best].item(), rel=1e-5)
    group_rows = [line.split("\t") for line in lines if line.count("\t") == 2 and not line.startswith("query")]
    assert [r[:2] for r in group_rows[:3]] == [["p0", "0"], ["p0", "1"], ["p0", "2"]]
    assert float(group_rows[0][2]) == pytest.approx(pool(s[0, :2]).item(), rel=1e-5)
    assert float(group_rows[2][2]) == 0.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    assert cli.main(["airrep", "embed", "--encoder", str(folder), "--data", str(bad), "--out", str(out)]) == 1
