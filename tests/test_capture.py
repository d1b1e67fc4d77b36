"""Capture: per-example features from one batched backward equal a brute-force loop of
single-example backward passes followed by explicit projection (float64)."""

import copy

import pytest
import torch
from torch import nn

from airtrace.capture import (
    ROOT,
    GradientCapture,
    LayerSpec,
    Projections,
    make_projections,
    per_example_loss,
    response_labels,
    select_layers,
)
from airtrace.ops.project_dense import project_dense

K_IN, K_OUT, SEED = 3, 4, 7


class Conv1D(nn.Module):
    """transformers' GPT-2 Conv1D layout: weight (d_in, d_out), out = x @ W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.view(*x.shape[:-1], self.nf)


class TinyLM(nn.Module):
    """One causal self-attention block + MLP; token embedding with padding_idx=0."""

    def __init__(self, vocab=11, d=6, max_len=8):
        super().__init__()
        self.tok = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(max_len, d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = Conv1D(d, d)
        self.up = Conv1D(2 * d, d)
        self.down = nn.Linear(2 * d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids, attention_mask=None):
        B, T = ids.shape
        h = self.tok(ids) + self.pos(torch.arange(T).expand(B, T))
        scores = self.q(h) @ self.k(h).transpose(1, 2) / h.shape[-1] ** 0.5
        allowed = torch.ones(T, T, dtype=torch.bool).tril()[None]
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, :]
        h = h + self.o(scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ self.v(h))
        h = h + self.down(torch.tanh(self.up(h)))
        return self.head(h)


class TokenWise(nn.Module):
    """Per-token model (no mixing across positions): the loss may count padding tokens."""

    def __init__(self, vocab=9, d=5, classes=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        return self.head(torch.tanh(self.fc(self.emb(ids))))


def mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 3))


def convnet():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 5, (2, 3), stride=(1, 2), padding=(0, 1)),
        nn.ReLU(),
        nn.Conv2d(5, 3, 3, padding="same", padding_mode="reflect"),
        nn.Flatten(),
        nn.Linear(36, 4),
    )


def grad_matrix(module, spec):
    """The explicit (d_out, d_in) weight gradient of the layer seen as a linear map."""
    W = module.weight.grad
    M = W.T if spec.kind in ("conv1d", "embedding") else W.reshape(W.shape[0], -1)
    return torch.cat([M, module.bias.grad[:, None]], 1) if spec.bias else M


def brute_force(model, layers, single_losses, projections):
    """Loop of single-example backward passes; per layer (B, k_out*k_in) or (B, d_out*d_in)."""
    modules = dict(model.named_modules())
    rows = {spec.name: [] for spec in layers}
    for loss in single_losses:
        model.zero_grad(set_to_none=True)
        loss().backward()
        for spec in layers:
            M = grad_matrix(modules[spec.name], spec)
            if projections is not None:
                P_in, P_out = projections[spec.name]
                M = P_out.T @ M @ P_in
            rows[spec.name].append(M.flatten())
    return {name: torch.stack(r) for name, r in rows.items()}


def captured(model, layers, batch_loss, projections, mask=None):
    model.zero_grad(set_to_none=True)
    with GradientCapture(model, layers, projections) as cap:
        cap.set_mask(mask)
        batch_loss().sum().backward()
        return cap.collect()


def assert_features_equal(actual, expected, rtol=1e-10, atol=1e-12):
    assert list(actual) == list(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol, msg=f"layer {name}")


def projections_for(layers, mode):
    if mode == "exact":  # sides no wider than 7 (in) / 6 (out) kept exact: some layers exact, some mixed
        return make_projections(layers, 7, 6, SEED, exact_small=True, dtype=torch.float64)
    return make_projections(layers, K_IN, K_OUT, SEED, dtype=torch.float64) if mode == "factored" else None


MODES = ["factored", "flat"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("B", [1, 4])
def test_mlp_classifier(mode, bias, B):
    torch.manual_seed(0)
    model = mlp().double()
    x, y = torch.randn(B, 6, dtype=torch.float64), torch.randint(0, 3, (B,))
    layers = select_layers(model, bias=bias)
    assert [s.kind for s in layers] == ["linear"] * 3 and all(s.bias == bias for s in layers)
    proj = projections_for(layers, mode)
    singles = [lambda b=b: per_example_loss(model(x[b : b + 1]), y[b : b + 1]).sum() for b in range(B)]
    expected = brute_force(model, layers, singles, proj)
    actual = captured(model, layers, lambda: per_example_loss(model(x), y), proj)
    assert_features_equal(actual, expected)
    width = K_OUT * K_IN if mode == "factored" else 8 * (6 + bias)
    assert actual["0"].shape == (B, width)


def lm_batch(B, seed=0):
    """Right-padded (pad id 0) prompt+response sequences of different lengths, labels on responses only."""
    g = torch.Generator().manual_seed(seed)
    lengths = [8 - (b * 3) % 5 for b in range(B)]
    T = max(lengths)
    ids = torch.zeros(B, T, dtype=torch.int64)
    mask = torch.zeros(B, T, dtype=torch.int64)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(0, 11, (n,), generator=g)  # real tokens may equal padding_idx 0
        mask[b, :n] = 1
    prompt = [1 + b % 3 for b in range(B)]
    return ids, mask, response_labels(ids, mask, prompt), lengths


@pytest.mark.parametrize("mode", MODES + ["exact"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("B", [1, 4])
def test_tiny_causal_lm_padded_batch_equals_unpadded_singles(mode, bias, B):
    torch.manual_seed(0)
    model = TinyLM().double()
    ids, mask, labels, lengths = lm_batch(B)
    layers = select_layers(model, "*", exclude="head", bias=bias)
    assert [s.kind for s in layers] == ["embedding"] * 2 + ["linear"] * 3 + ["conv1d"] * 2 + ["linear"]
    proj = projections_for(layers, mode)

    def single(b):
        n = lengths[b]
        return per_example_loss(model(ids[b : b + 1, :n]), labels[b : b + 1, :n], "causal_lm").sum()

    expected = brute_force(model, layers, [lambda b=b: single(b) for b in range(B)], proj)
    batch = lambda: per_example_loss(model(ids, mask), labels, "causal_lm")  # noqa: E731
    assert_features_equal(captured(model, layers, batch, proj, mask), expected)


@pytest.mark.parametrize("mode", MODES)
def test_mask_removes_padding_tokens_that_the_loss_counts(mode):
    """Padding positions get nonzero G here; only the mask makes the batch equal the singles."""
    torch.manual_seed(0)
    model = TokenWise().double()
    B, T, lengths = 3, 5, [5, 2, 3]
    ids, targets = torch.randint(0, 9, (B, T)), torch.randint(0, 4, (B, T))
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    layers = select_layers(model)
    proj = projections_for(layers, mode)

    def token_losses(ids, targets):  # (B, n) -> (B, n)
        return per_example_loss(model(ids).flatten(0, 1), targets.flatten()).view(ids.shape)

    def single(b):
        n = lengths[b]
        return token_losses(ids[b : b + 1, :n], targets[b : b + 1, :n]).sum()

    singles = [lambda b=b: single(b) for b in range(B)]
    expected = brute_force(model, layers, singles, proj)
    batch = lambda: token_losses(ids, targets).sum(1)  # noqa: E731
    assert_features_equal(captured(model, layers, batch, proj, mask), expected)
    unmasked = captured(model, layers, batch, proj)
    assert not torch.allclose(unmasked["fc"], expected["fc"])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("B", [1, 3])
def test_conv_net(mode, bias, B):
    torch.manual_seed(0)
    model = convnet().double()
    x, y = torch.randn(B, 3, 9, 9, dtype=torch.float64), torch.randint(0, 4, (B,))
    layers = select_layers(model, bias=bias)
    assert [s.kind for s in layers] == ["conv2d"] * 3 + ["linear"]
    assert (layers[1].d_in, layers[1].d_out) == (4 * 2 * 3 + bias, 5)
    proj = projections_for(layers, mode)
    singles = [lambda b=b: per_example_loss(model(x[b : b + 1]), y[b : b + 1]).sum() for b in range(B)]
    expected = brute_force(model, layers, singles, proj)
    assert_features_equal(captured(model, layers, lambda: per_example_loss(model(x), y), proj), expected)


def test_flat_blocks_feed_dense_projection():
    torch.manual_seed(0)
    model = mlp().double()
    x, y = torch.randn(3, 6, dtype=torch.float64), torch.randint(0, 3, (3,))
    layers = select_layers(model, bias=True)
    singles = [lambda b=b: per_example_loss(model(x[b : b + 1]), y[b : b + 1]).sum() for b in range(3)]
    expected = torch.cat(list(brute_force(model, layers, singles, None).values()), 1)
    blocks = list(captured(model, layers, lambda: per_example_loss(model(x), y), None).values())
    out = project_dense(blocks, 16, 5, "gaussian", backend="torch")
    torch.testing.assert_close(out, project_dense(expected, 16, 5, "gaussian", backend="torch"))


def test_float32_default_backend_matches_float64_brute_force():
    torch.manual_seed(0)
    model = TinyLM()
    ids, mask, labels, lengths = lm_batch(3, seed=1)
    layers = select_layers(model, ["q", "o", "tok"])
    proj = make_projections(layers, K_IN, K_OUT, SEED)
    actual = captured(model, layers, lambda: per_example_loss(model(ids, mask), labels, "causal_lm"), proj, mask)
    model64, proj64 = copy.deepcopy(model).double(), make_projections(layers, K_IN, K_OUT, SEED, dtype=torch.float64)

    def single(b):
        n = lengths[b]
        return per_example_loss(model64(ids[b : b + 1, :n]), labels[b : b + 1, :n], "causal_lm").sum()

    expected = brute_force(model64, layers, [lambda b=b: single(b) for b in range(3)], proj64)
    for name in expected:
        assert actual[name].dtype == torch.float32
        torch.testing.assert_close(actual[name].double(), expected[name], rtol=1e-4, atol=1e-5)


def test_tied_module_called_twice_sums_both_calls():
    torch.manual_seed(0)
    fc = nn.Linear(4, 4).double()
    model = nn.Sequential(fc, nn.Tanh(), fc)
    x = torch.randn(2, 4, dtype=torch.float64)
    layers = select_layers(model, "0")
    singles = [lambda b=b: model(x[b : b + 1]).pow(2).sum() for b in range(2)]
    expected = brute_force(model, layers, singles, None)
    assert_features_equal(captured(model, layers, lambda: model(x).pow(2).sum(1), None), expected)


@pytest.mark.parametrize("where", ["input", "gradient"])
def test_non_finite_values_name_the_layer(where):
    torch.manual_seed(0)
    model = mlp().double()
    x = torch.randn(2, 6, dtype=torch.float64)
    scale = 1.0
    if where == "input":
        x[1, 2] = float("nan")
    else:
        scale = float("inf")
    layers = select_layers(model)
    with GradientCapture(model, layers, make_projections(layers, 2, 2, 0, dtype=torch.float64)) as cap:
        (model(x).sum() * scale).backward()
        with pytest.raises(ValueError, match=r"layer '0'.*non-finite"):
            cap.collect()


def test_patterns_matching_nothing_list_available_layers():
    model = mlp()
    with pytest.raises(ValueError, match=r"'attn\*' matches no supported layer; available: 0, 2, 4"):
        select_layers(model, ["0", "attn*"])
    with pytest.raises(ValueError, match="no layer left.*available: 0, 2, 4"):
        select_layers(model, "*", exclude=["0", "[24]"])
    assert [s.name for s in select_layers(model, "*", exclude="2")] == ["0", "4"]


def test_unsupported_layers_and_inputs_raise():
    with pytest.raises(ValueError, match="groups must be 1"):
        select_layers(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)))
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    layers = select_layers(model)
    with GradientCapture(model, layers) as cap:
        model[0](torch.randn(2, 3)).sum().backward()
        with pytest.raises(ValueError, match="layer '1' captured nothing"):
            cap.collect()
    with GradientCapture(model, layers) as cap:
        cap.set_mask(torch.ones(2, 4))
        with pytest.raises(ValueError, match=r"layer '\d': mask of shape \(2, 4\) does not fit"):
            model(torch.randn(2, 3, 3)).sum().backward()
    frozen = nn.Embedding(5, 3).requires_grad_(False)
    with pytest.raises(ValueError, match=r"'\*' matches only frozen layers \(<root>"):
        select_layers(frozen)
    with GradientCapture(frozen, [LayerSpec(ROOT, "embedding", 5, 3)]) as cap:
        with pytest.raises(ValueError, match="does not require grad"):
            frozen(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="has no projection"):
        GradientCapture(model, layers, make_projections(layers[:1], 2, 2, 0))


def test_projections_are_deterministic_and_rebuildable():
    layers = select_layers(TinyLM())
    a = make_projections(layers, 5, 3, 123)
    b = Projections.from_config(a.config())
    assert a.config() == b.config()
    for spec in layers:
        P_in, P_out = a[spec.name]
        assert P_in.shape == (spec.d_in, 5) and P_out.shape == (spec.d_out, 3)
        assert torch.equal(P_in, b[spec.name][0]) and torch.equal(P_out, b[spec.name][1])
    assert not torch.equal(a["q"][0], a["k"][0])
    assert not torch.equal(a["q"][0], make_projections(layers, 5, 3, 124)["q"][0])
    big = make_projections(select_layers(nn.Linear(400, 300)), 50, 40, 0, dtype=torch.float64)[ROOT]
    assert abs(big[0].var().item() * 50 - 1) < 0.05 and abs(big[1].var().item() * 40 - 1) < 0.05


def test_per_example_loss_and_response_labels():
    ids = torch.tensor([[5, 6, 7, 8], [4, 3, 9, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    labels = response_labels(ids, mask, [2, 1])
    assert labels.tolist() == [[-100, -100, 7, 8], [-100, 3, 9, -100]]
    logits = torch.randn(2, 4, 10, dtype=torch.float64)
    logp = logits.log_softmax(-1)
    expected = torch.stack(
        [sum(-logp[b, t - 1, labels[b, t]] for t in range(1, 4) if labels[b, t] != -100) for b in range(2)]
    )
    torch.testing.assert_close(per_example_loss(logits, labels, "causal_lm"), expected)
    cls = torch.randn(3, 4, dtype=torch.float64)
    y = torch.tensor([0, 3, 1])
    torch.testing.assert_close(per_example_loss(cls, y), -cls.log_softmax(-1)[torch.arange(3), y])
    with pytest.raises(ValueError, match="task must be"):
        per_example_loss(cls, y, "regression")
