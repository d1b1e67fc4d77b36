"""AirRep LoRA training: a zero adapter leaves the encoder exact, adapter gradients equal a plain float64 backward
(and the chain rule through the merged weight), frozen weights stay, save/load of the trained encoder, CLI flags.

A tiny randomly initialised 3-layer BERT in float64 (no MiniLM weights needed).
"""

import re

import pytest
import torch

from airtrace import cli
from airtrace.airrep import lora
from airtrace.airrep.encoder import Encoder
from airtrace.airrep.objective import ranknet_loss
from airtrace.airrep.train import TrainConfig, _encoders, cached_step, subset_scores, train
from test_airrep import TEXTS
from test_airrep_layers import planted_labels, tiny_encoder

MASKS = torch.tensor([[1, 1, 0, 1, 0, 0, 1], [0, 1, 1, 0, 1, 1, 0], [1, 0, 0, 0, 1, 1, 1]], dtype=torch.bool)
LABELS = torch.tensor([[1.0, -0.5, 0.3], [0.0, 0.2, -1.0], [-2.0, 1.5, 0.0]], dtype=torch.float64)


def randomize_b(encoder, seed=0):
    """Non-zero B factors (a trained-looking adapter), so that A has a gradient too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, lora.LoRALinear):
                module.lora_b.copy_(0.3 * torch.randn(module.lora_b.shape, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("targets", sorted(lora.TARGETS))
def test_zero_adapter_leaves_the_encoder_exact(targets):
    encoder = tiny_encoder(seed=1)
    before = encoder.embed(TEXTS)
    params = lora.apply(encoder.layers()[1:], rank=2, alpha=4.0, targets=targets, seed=3)
    assert len(params) == 2 * 2 * len(lora.TARGETS[targets])            # A and B per target, 2 layers
    assert all(p.requires_grad for p in params) and any(p.abs().max() > 0 for p in params[0::2])   # A is not 0
    assert torch.equal(encoder.embed(TEXTS), before)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        lora.apply(encoder.layers()[2:], rank=2, alpha=4.0, targets=targets)


def test_adapter_forward_and_merge_by_hand():
    linear = torch.nn.Linear(5, 3).double()
    wrapped = lora.LoRALinear(linear, rank=2, alpha=3.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        wrapped.lora_b.copy_(torch.arange(6, dtype=torch.float64).reshape(3, 2) - 2.5)
    x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = x @ linear.weight.T + linear.bias + 1.5 * (x @ wrapped.lora_a.T) @ wrapped.lora_b.T
    assert torch.allclose(wrapped(x), expected, rtol=0, atol=1e-14)
    assert wrapped.weight is linear.weight and not wrapped.weight.requires_grad
    holder = torch.nn.Sequential(wrapped)
    state = lora.merged_state_dict(holder)
    assert set(state) == {"0.weight", "0.bias"}
    assert torch.allclose(state["0.weight"], linear.weight + 1.5 * wrapped.lora_b @ wrapped.lora_a, rtol=0, atol=1e-14)
    assert lora.merge(holder) == 1 and type(holder[0]) is torch.nn.Linear
    assert torch.allclose(holder[0](x), expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("top_layers", [1, 3])
def test_adapter_gradients_equal_plain_backward(top_layers, tmp_path):
    encoder = tiny_encoder(seed=2)
    train_texts, dev_texts, dev_rows = TEXTS[:7], TEXTS[7:], torch.tensor([0, 2, 1])
    config = TrainConfig(trainable="lora", top_layers=top_layers, lora_rank=2, lora_alpha=2.0)
    encode_dev, encode_train, params = _encoders(encoder, train_texts, dev_texts, config, False, cache_dir=tmp_path)
    randomize_b(encoder)
    encoder.zero_grad()
    loss = cached_step(encode_dev, encode_train, dev_rows, MASKS, LABELS, chunk=2)
    cached = {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}
    adapters = {name for name in cached if name.endswith(("lora_a", "lora_b"))}
    assert len(adapters) == 2 * 6 * top_layers and cached.keys() == adapters | {"projector.weight", "projector.bias"}
    assert len(params) == len(cached)

    encoder.zero_grad()                      # the plain backward through the whole (wrapped) encoder
    f = subset_scores(encoder.encode([dev_texts[i] for i in dev_rows]), encoder.encode(train_texts), MASKS,
                      "attention")
    plain_loss = ranknet_loss(f, LABELS)
    plain_loss.backward()
    assert loss == pytest.approx(plain_loss.item(), rel=1e-12)
    for name, p in encoder.named_parameters():
        if name in cached:
            assert torch.allclose(cached[name], p.grad, rtol=1e-9, atol=1e-12), name
        else:
            assert p.grad is None, name      # frozen: no gradient computed

    # chain rule through the merged weight W' = W + s B A: dL/dB = s G Aᵀ, dL/dA = s Bᵀ G with G = dL/dW'
    plain = tiny_encoder(seed=2)
    plain.load_state_dict(lora.merged_state_dict(encoder))
    plain.requires_grad_(True)
    f = subset_scores(plain.encode([dev_texts[i] for i in dev_rows]), plain.encode(train_texts), MASKS, "attention")
    ranknet_loss(f, LABELS).backward()
    layer = 3 - top_layers
    for path in ("attention.self.query", "output.dense"):
        wrapped = encoder.layers()[layer].get_submodule(path)
        G = plain.layers()[layer].get_submodule(path).weight.grad
        prefix = f"backbone.encoder.layer.{layer}.{path}."
        assert torch.allclose(cached[prefix + "lora_b"], wrapped.scale * G @ wrapped.lora_a.detach().T, rtol=1e-9,
                              atol=1e-12)
        assert torch.allclose(cached[prefix + "lora_a"], wrapped.scale * wrapped.lora_b.detach().T @ G, rtol=1e-9,
                              atol=1e-12)


def test_lora_training_keeps_frozen_weights_and_round_trips(tmp_path):
    encoder = tiny_encoder(seed=2)
    masks, outputs = planted_labels(encoder)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    seen = []

    def check_frozen(step):                  # while training: every backbone weight as it was, adapters moving
        state = encoder.state_dict()
        assert all(torch.equal(state[k], v) for k, v in before.items() if k.startswith("backbone"))
        seen.append(max(float(m.lora_b.detach().abs().max()) for m in encoder.modules() if isinstance(m, lora.LoRALinear)))

    config = TrainConfig(steps=60, lr=5e-2, warmup=0.05, dev_batch=4, subset_batch=12, trainable="lora",
                         top_layers=1, lora_rank=2, lora_alpha=2.0)
    losses = train(encoder, TEXTS[:6], TEXTS[6:], masks, outputs, config, progress=False, cache_dir=tmp_path,
                   callback=check_frozen, every=20)
    assert len(seen) == 3 and seen[0] > 0
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5     # 0.47 here; 0.58-0.74 with seeds 3, 5, 7
    assert not any(isinstance(m, lora.LoRALinear) for m in encoder.modules())       # folded in at the end
    after = encoder.state_dict()
    assert after.keys() == before.keys()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    adapted = {f"backbone.encoder.layer.2.{path}.weight" for path in lora.TARGETS["attention+mlp"]}
    assert changed == adapted | {"projector.weight", "projector.bias"}
    assert len(list(tmp_path.glob("*.safetensors"))) == 2                    # dev and train layer caches

    encoder = encoder.float()                # saved and loaded as float32
    loaded = Encoder.load(encoder.save(tmp_path / "enc"))
    assert torch.equal(loaded.embed(TEXTS), encoder.embed(TEXTS))
    wrapped = tiny_encoder(seed=3).float()   # an encoder saved with its adapters still on: saved folded in
    lora.apply(wrapped.layers(), rank=3, alpha=1.0)
    randomize_b(wrapped, seed=4)
    # float32 rounding of W x + s B (A x) against (W + s B A) x: |e| ~ 1 here
    assert torch.allclose(Encoder.load(wrapped.save(tmp_path / "wrapped")).embed(TEXTS), wrapped.embed(TEXTS),
                          rtol=0, atol=1e-5)


@pytest.mark.parametrize("settings, message", [
    (dict(lora_rank=0), "LoRA rank must be an int >= 1"),
    (dict(lora_rank=2.0), "LoRA rank must be an int >= 1"),
    (dict(lora_alpha=0.0), "LoRA alpha must be a positive number"),
    (dict(lora_targets="mlp+attention"), "LoRA targets must be one of"),
])
def test_bad_lora_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(trainable="lora", **settings)


@pytest.mark.parametrize("argv, message", [
    (["--lora-rank", "4"], "--lora-rank only apply with --trainable lora"),
    (["--trainable", "top", "--lora-alpha", "2", "--lora-targets", "mlp"],
     "--lora-alpha, --lora-targets only apply with --trainable lora"),
    (["--trainable", "lora", "--lora-rank", "0"], "--lora-rank: .*0"),
    (["--trainable", "lora", "--lora-alpha", "-1"], "--lora-alpha: .*-1"),
    (["--trainable", "lora", "--lora-targets", "all"], "--lora-targets: invalid choice"),
    (["--projector-lr", "0"], "projector_lr must be None, > 0, or 0 outside the projector mode"),
    (["--trainable", "lora", "--projector-lr=-1e-5"], "projector_lr must be None, > 0, or 0 outside"),
])
def test_cli_lora_flag_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["airrep", "train", "--out", "/nonexistent-airrep-out", *argv])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_cli_top_layers_beyond_the_backbone(tmp_path, capsys):
    encoder = tiny_encoder()
    encoder.backbone.save_pretrained(tmp_path / "base")
    encoder.tokenizer.save_pretrained(tmp_path / "base")
    with pytest.raises(SystemExit) as exc:          # refused before any label is generated
        cli.main(["airrep", "train", "--out", str(tmp_path / "out"), "--base", str(tmp_path / "base"),
                  "--trainable", "lora", "--top-layers", "4", "--lora-rank", "2"])
    assert exc.value.code == 2
    assert "--top-layers 4: the backbone has 3 layers" in capsys.readouterr().err


@pytest.mark.parametrize("projector_lr", [0.0, 1e-9])
def test_projector_lr_freezes_or_slows_the_projector(projector_lr, tmp_path):
    encoder = tiny_encoder(seed=5)
    masks = torch.rand(8, 6, generator=torch.Generator().manual_seed(1)) < 0.5
    outputs = torch.randn(8, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    projector = encoder.projector.weight.clone()
    config = TrainConfig(steps=5, lr=1e-2, dev_batch=4, subset_batch=8, trainable="lora", lora_rank=2,
                         projector_lr=projector_lr)
    train(encoder, TEXTS[:6], TEXTS[6:], masks, outputs, config, progress=False, cache_dir=tmp_path)
    moved = (encoder.projector.weight - projector).abs().max()
    # an Adam step moves a weight by at most (1 - β1) / √(1 - β2) ≈ 3.2 times its learning rate (here 1e-9, not 1e-2)
    assert moved == 0 if projector_lr == 0 else 0 < moved < 5 * 3.2 * projector_lr
    assert encoder.projector.weight.requires_grad          # unfrozen again after training
    assert not torch.equal(encoder.layers()[2].attention.self.query.weight,
                           tiny_encoder(seed=5).layers()[2].attention.self.query.weight)
