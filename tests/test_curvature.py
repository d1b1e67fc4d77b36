"""Curvature: every method against its dense float64 definition, on random data and a tiny real model."""

import functools
import json
from typing import NamedTuple

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from airtrace import curvature as cv
from airtrace.curvature.methods import kfac as kfac_method
from airtrace.ops.precondition import reference as precondition_ekfac
from airtrace.ops.project_factored import reference as project_factored_reference
from airtrace.util.checked_file import save_checked

F64 = torch.float64
METHODS = ["fisher", "lowrank", "kfac", "ekfac"]
RANK = 5


class Data(NamedTuple):
    """Token-level a (B, T, k_in), g (B, T, k_out), mask (B, T) and features ĝ (B, k_out, k_in) per layer."""

    activations: dict
    gradients: dict
    mask: torch.Tensor
    features: dict

    def rows(self, lo, hi):
        pick = lambda d: {name: x[lo:hi] for name, x in d.items()}  # noqa: E731
        return Data(pick(self.activations), pick(self.gradients), self.mask[lo:hi], pick(self.features))


@functools.cache
def random_data() -> Data:
    """Two layers of random tokens with a weighted mask (weights multiply g, zeros drop the token)."""
    g = torch.Generator().manual_seed(0)
    B, T = 24, 3
    mask = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=F64)[torch.randint(4, (B, T), generator=g)]
    acts, grads, feats = {}, {}, {}
    for name, (k_out, k_in) in {"a": (3, 4), "b.proj": (2, 5)}.items():
        acts[name] = torch.randn(B, T, k_in, generator=g, dtype=F64)
        grads[name] = torch.randn(B, T, k_out, generator=g, dtype=F64)
        feats[name] = torch.einsum("bto,bti->boi", grads[name] * mask[..., None], acts[name])
    return Data(acts, grads, mask, feats)


def _tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


@functools.cache
def _model_batch():
    """Inputs (B, T, 5), labels (B, T) and a padding mask (B, T) for the tiny sequence classifier."""
    g = torch.Generator().manual_seed(1)
    B, T = 16, 4
    X = torch.randn(B, T, 5, generator=g, dtype=F64)
    y = torch.randint(3, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    return X, y, torch.arange(T)[None, :] < lengths[:, None]


def _loss(model, X, y, mask):
    per_token = F.cross_entropy(model(X).reshape(-1, 3), y.reshape(-1), reduction="none")
    return (per_token * mask.reshape(-1)).sum()


@functools.cache
def _projections():
    g = torch.Generator().manual_seed(2)
    # layer: (P_in (d_in, k_in), P_out (d_out, k_out))
    return {
        "0": (torch.randn(5, 3, generator=g, dtype=F64), torch.randn(6, 4, generator=g, dtype=F64)),
        "2": (torch.randn(6, 4, generator=g, dtype=F64), torch.randn(3, 3, generator=g, dtype=F64)),
    }


def _capture(name, A, G):
    """Forward hook storing the layer input A[name] (B, T, d_in) and, on backward, G[name] (B, T, d_out)."""

    def hook(module, inputs, output):
        A[name] = inputs[0].detach()
        output.register_hook(lambda grad: G.__setitem__(name, grad.detach()))

    return hook


@functools.cache
def model_data() -> Data:
    """Hooks on both Linear layers of a real model: A, G -> projected tokens and features."""
    model, (X, y, mask) = _tiny_model(), _model_batch()
    A, G = {}, {}
    for name in _projections():
        model.get_submodule(name).register_forward_hook(_capture(name, A, G))
    _loss(model, X, y, mask).backward()
    acts, grads, feats = {}, {}, {}
    for name, (P_in, P_out) in _projections().items():
        acts[name], grads[name] = A[name] @ P_in, G[name] @ P_out
        feats[name] = project_factored_reference(A[name], G[name], P_in, P_out, mask)
    return Data(acts, grads, mask.to(F64), feats)


@pytest.fixture(params=["random", "model"])
def data(request) -> Data:
    return random_data() if request.param == "random" else model_data()


# ------------------------------------------------------------------ dense helpers


def _vec(x):
    """(B, k_out, k_in) -> (B, k_out*k_in), row-major: index i*k_in + j."""
    return x.reshape(x.shape[0], -1)


def _dense_fisher(x):
    v = _vec(x)
    return v.T @ v / v.shape[0]


def _apply(matrix, x):
    return (_vec(x) @ matrix.T).reshape(x.shape)


def _token_factors(data, name):
    """S_G, S_A = (1/N) Σ_tokens (m g)(m g)ᵀ, a aᵀ over tokens with m != 0."""
    N = data.mask.shape[0]
    keep = data.mask.reshape(-1) != 0
    a = data.activations[name].reshape(-1, data.activations[name].shape[-1])[keep]
    g = (data.gradients[name] * data.mask[..., None]).reshape(-1, data.gradients[name].shape[-1])[keep]
    return g.T @ g / N, a.T @ a / N


def _eye(n):
    return torch.eye(n, dtype=F64)


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))


def _fit(method, data, damping=None):
    if method == "kfac" or method == "ekfac":
        fitter = cv.KFACFitter(damping)
        fitter.update(data.activations, data.gradients, data.mask)
        if method == "kfac":
            return fitter.finalize()
        fitter = cv.EKFACFitter(fitter.finalize(), damping)
    else:
        fitter = cv.FisherFitter(damping) if method == "fisher" else cv.LowRankFitter(RANK, damping)
    fitter.update(data.features)
    return fitter.finalize()


# ------------------------------------------------------------------ the data itself


def test_model_features_are_projected_per_example_gradients():
    """The real-model fixture's features equal brute-force single-example backward passes, projected."""
    model, (X, y, mask) = _tiny_model(), _model_batch()
    features = model_data().features
    for b in range(X.shape[0]):
        model.zero_grad()
        _loss(model, X[b : b + 1], y[b : b + 1], mask[b : b + 1]).backward()
        for name, (P_in, P_out) in _projections().items():
            weight_grad = model.get_submodule(name).weight.grad  # (d_out, d_in)
            _close(features[name][b], P_out.T @ weight_grad @ P_in)


# ------------------------------------------------------------------ methods vs dense definitions


def test_fisher_inverse_equals_dense_inverse(data):
    fit = _fit("fisher", data)
    out = fit.precondition(data.features)
    for name, x in data.features.items():
        Fm = _dense_fisher(x)
        lam = 0.1 * float(Fm.trace()) / Fm.shape[0]
        assert fit.damping[name] == pytest.approx(lam, rel=1e-12)
        _close(out[name], _apply(torch.linalg.inv(Fm + lam * _eye(Fm.shape[0])), x))


def test_kfac_equals_explicit_kronecker_inverse(data):
    fit = _fit("kfac", data)
    out = fit.precondition(data.features)
    for name, x in data.features.items():
        S_G, S_A = _token_factors(data, name)
        K = torch.kron(S_G, S_A)  # pairs with the row-major vec(ĝ)
        lam = 0.1 * float(torch.linalg.eigvalsh(K).mean())
        assert fit.damping[name] == pytest.approx(lam, rel=1e-9)
        _close(out[name], _apply(torch.linalg.inv(K + lam * _eye(K.shape[0])), x))


def test_ekfac_equals_its_definition(data):
    kfac_fit = _fit("kfac", data)
    fitter = cv.EKFACFitter(kfac_fit)
    fitter.update(data.features)
    fit = fitter.finalize()
    out = fit.precondition(data.features)
    for name, x in data.features.items():
        base = kfac_fit.inverses[name]
        S_G, S_A = _token_factors(data, name)
        _close(base.eigvecs_G.T @ S_G @ base.eigvecs_G, torch.diag(torch.linalg.eigvalsh(S_G)))
        _close(base.eigvecs_A.T @ S_A @ base.eigvecs_A, torch.diag(torch.linalg.eigvalsh(S_A)))
        Q = torch.kron(base.eigvecs_G, base.eigvecs_A)
        vec_lam = ((_vec(x) @ Q) ** 2).mean(0)  # (1/N) Σ_b (Qᵀ vec ĝ_b)²
        lam = 0.1 * float(vec_lam.mean())
        assert fit.damping[name] == pytest.approx(lam, rel=1e-12)
        _close(fit.inverses[name].eigenvalues.reshape(-1), vec_lam)
        _close(out[name], _apply(Q @ torch.diag(1 / (vec_lam + lam)) @ Q.T, x))


def test_ekfac_with_kronecker_eigenvalues_is_kfac(data):
    kfac_fit = _fit("kfac", data)
    corrections = {}
    for name in data.features:
        S_G, S_A = _token_factors(data, name)
        corrections[name] = torch.outer(torch.linalg.eigvalsh(S_G), torch.linalg.eigvalsh(S_A))
    fit = cv.ekfac(kfac_fit, corrections)
    for name, x in data.features.items():
        assert fit.damping[name] == pytest.approx(kfac_fit.damping[name], rel=1e-9)
        _close(fit.precondition({name: x})[name], kfac_fit.precondition({name: x})[name])


def test_reference_precondition_ekfac_matches_kronecker_formula():
    g = torch.Generator().manual_seed(3)
    G_hat = torch.randn(4, 3, 5, generator=g)
    Q_G = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=F64))[0]
    Q_A = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=F64))[0]
    Lam = torch.rand(3, 5, generator=g, dtype=F64)
    out = precondition_ekfac(G_hat, Q_G, Q_A, Lam, 0.3)
    assert out.dtype == torch.float32 and out.shape == (4, 3, 5)
    Q = torch.kron(Q_G, Q_A)
    expected = _apply(Q @ torch.diag(1 / (Lam.reshape(-1) + 0.3)) @ Q.T, G_hat.to(F64))
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)


def test_woodbury_equals_dense_low_rank_inverse(data):
    fit = _fit("lowrank", data)
    out = fit.precondition(data.features)
    for name, x in data.features.items():
        e, V = torch.linalg.eigh(_dense_fisher(x))
        U, s = V[:, -RANK:], e[-RANK:]
        lam = 0.1 * float(e.mean())
        assert fit.damping[name] == pytest.approx(lam, rel=1e-9)
        assert fit.inverses[name].eigvecs.shape == (x.shape[1] * x.shape[2], RANK)
        _close(out[name], _apply(torch.linalg.inv(U @ torch.diag(s) @ U.T + lam * _eye(len(e))), x))


def test_woodbury_at_full_rank_equals_damped_fisher(data):
    full = max(x.shape[1] * x.shape[2] for x in data.features.values())
    fitter = cv.LowRankFitter(full)
    fitter.update(data.features)
    low, fisher = fitter.finalize(), _fit("fisher", data)
    for name, x in data.features.items():
        _close(low.precondition({name: x})[name], fisher.precondition({name: x})[name])


@pytest.mark.parametrize("method", METHODS)
def test_inexact_precondition_is_float32_and_close_to_float64(method, monkeypatch):
    data = model_data()
    fit = _fit(method, data)
    kernel_dtypes = []
    kernel = kfac_method.precondition
    monkeypatch.setattr(kfac_method, "precondition", lambda G_hat, *a, **k: kernel_dtypes.append(G_hat.dtype) or kernel(G_hat, *a, **k))
    x32 = {name: x.float() for name, x in data.features.items()}
    fast, exact = fit.precondition(x32, exact=False), fit.precondition(data.features)
    if method in ("kfac", "ekfac"):  # the fused kernel ran in float32, the exact path in float64
        assert set(kernel_dtypes) == {torch.float32, torch.float64}
    for name, x in fast.items():
        assert x.dtype == torch.float32
        scale = float(exact[name].abs().max())
        torch.testing.assert_close(x.double(), exact[name], rtol=1e-3, atol=1e-4 * scale)
    assert all(x.dtype == torch.float64 for x in fit.precondition(data.features, exact=False).values())


def test_identity_returns_features():
    x = random_data().features["a"].float()
    fit = cv.identity({"a": (3, 4)})
    out = fit.precondition({"a": x})["a"]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x, rtol=0, atol=0)


# ------------------------------------------------------------------ damping


@pytest.mark.parametrize("method", METHODS)
def test_relative_damping_is_factor_times_mean_eigenvalue_and_reported(method, tmp_path):
    data = random_data()
    default, half, absolute = _fit(method, data), _fit(method, data, cv.Damping(factor=0.5)), _fit(method, data, 0.3)
    assert default.damping_factor == 0.1 and half.damping_factor == 0.5 and absolute.damping_factor is None
    for name in data.features:
        assert half.damping[name] == pytest.approx(5 * default.damping[name], rel=1e-12)
        assert absolute.damping[name] == 0.3
    default.save(tmp_path / "c.safetensors")
    with safe_open(tmp_path / "c.safetensors", framework="pt") as f:
        meta = json.loads(f.metadata()[cv.METADATA_KEY])
    assert meta["method"] == method and meta["damping_factor"] == 0.1
    assert meta["damping"] == default.damping and meta["layers"] == ["a", "b.proj"]
    assert meta["dims"] == {"a": [3, 4], "b.proj": [2, 5]} and meta["n_examples"] == 24


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True])
def test_damping_must_be_positive_and_finite(bad):
    with pytest.raises(ValueError, match="Damping.value must be a finite number > 0"):
        cv.FisherFitter(bad)
    with pytest.raises(ValueError, match="Damping.factor must be a finite number > 0"):
        cv.Damping(factor=bad)


def test_zero_features_need_absolute_damping():
    fitter = cv.FisherFitter()
    fitter.update({"fc": torch.zeros(3, 2, 2)})
    with pytest.raises(ValueError, match="layer 'fc': relative damping .* absolute Damping"):
        fitter.finalize()


# ------------------------------------------------------------------ streaming


@pytest.mark.parametrize("method", METHODS)
def test_streaming_equals_one_shot(method):
    data = model_data()
    chunks = [data.rows(0, 5), data.rows(5, 6), data.rows(6, 16)]
    if method in ("kfac", "ekfac"):
        fitter = cv.KFACFitter()
        for c in chunks:
            fitter.update(c.activations, c.gradients, c.mask)
        if method == "ekfac":
            fitter = cv.EKFACFitter(fitter.finalize())
    else:
        fitter = cv.FisherFitter() if method == "fisher" else cv.LowRankFitter(RANK)
    if method != "kfac":
        for c in chunks:
            fitter.update(c.features)
    streamed, one_shot = fitter.finalize(), _fit(method, data)
    assert streamed.n_examples == one_shot.n_examples == 16
    assert streamed.damping == pytest.approx(one_shot.damping, rel=1e-12)
    for name, x in streamed.precondition(data.features).items():
        _close(x, one_shot.precondition(data.features)[name])


def test_fitter_states_of_disjoint_parts_add_up_to_one_fit():
    """load_states(part states) = one fitter over all the data (what the ranks of a distributed fit do)."""
    data = model_data()
    parts = [data.rows(0, 7), data.rows(7, 7), data.rows(7, 16)]

    def fitters():
        return cv.FisherFitter(), cv.LowRankFitter(RANK), cv.KFACFitter()

    def feed(fs, d):
        for f in fs[:2]:
            if d.mask.shape[0]:
                f.update(d.features)
        if d.mask.shape[0]:
            fs[2].update(d.activations, d.gradients, d.mask)

    whole = fitters()
    feed(whole, data)
    per_part = [fitters() for _ in parts]
    for fs, d in zip(per_part, parts):
        feed(fs, d)
    for i, reference in enumerate(whole):
        merged = fitters()[i]
        merged.load_states([fs[i].state() for fs in per_part])
        assert merged.n_examples == reference.n_examples == 16
        for name, x in merged.finalize().precondition(data.features).items():
            _close(x, reference.finalize().precondition(data.features)[name])


# ------------------------------------------------------------------ errors


def test_nan_or_inf_input_names_the_layer():
    data = random_data()
    bad = dict(data.features, **{"b.proj": data.features["b.proj"].clone()})
    bad["b.proj"][2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer 'b.proj': features contain 1 NaN/Inf"):
        cv.FisherFitter().update(bad)
    with pytest.raises(ValueError, match=r"layer 'b.proj': features contain 1 NaN/Inf"):
        _fit("fisher", data).precondition(bad)
    with pytest.raises(ValueError, match=r"layer 'b.proj': features contain 1 NaN/Inf"):
        cv.EKFACFitter(_fit("kfac", data)).update(bad)
    grads = dict(data.gradients, a=data.gradients["a"].clone())
    grads["a"][0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"layer 'a': gradients contain 1 NaN/Inf"):
        cv.KFACFitter().update(data.activations, grads, data.mask)


def test_non_psd_factor_names_the_layer_and_its_most_negative_eigenvalue():
    S_G = torch.eye(2, dtype=F64)
    S_A = torch.diag(torch.tensor([2.0, 1.0, -0.5], dtype=F64))
    not_psd = "is not positive semi-definite: most negative eigenvalue -0.5"
    with pytest.raises(ValueError, match=f"layer 'fc': S_A {not_psd}"):
        cv.kfac({"fc": (S_G, S_A)})
    with pytest.raises(ValueError, match=f"layer 'fc': Fisher {not_psd}"):
        cv.low_rank({"fc": S_A.reshape(1, 3, 1, 3)}, rank=2)
    kfac_fit = cv.kfac({"fc": (S_G, torch.eye(3, dtype=F64))})
    with pytest.raises(ValueError, match=r"layer 'fc': EK-FAC eigenvalues is not positive semi-definite"):
        cv.ekfac(kfac_fit, {"fc": -torch.ones(2, 3, dtype=F64)})


def test_float32_round_off_is_allowed_only_for_sums_of_float32_products():
    S_G = torch.eye(2, dtype=F64)
    S_A = torch.diag(torch.tensor([1.0, 0.5, -1e-7], dtype=F64))  # float32-sized round-off
    with pytest.raises(ValueError, match="layer 'fc': S_A is not positive semi-definite"):
        cv.kfac({"fc": (S_G, S_A)})
    assert cv.kfac({"fc": (S_G, S_A)}, psd_tol=cv.PSD_TOL_FLOAT32).inverses["fc"].eigenvalues.min() == 0
    a, g = torch.randn(2, 3, 4, dtype=F64), torch.randn(2, 3, 5, dtype=F64)
    fitter = cv.KFACFitter()
    fitter.update({"fc": a}, {"fc": g})
    assert not fitter.float32_products
    fitter.update({"fc": a.float()}, {"fc": g.float()})
    assert fitter.float32_products


def test_cholesky_failure_names_the_layer_and_advises_more_damping():
    indefinite = torch.diag(torch.tensor([1.0, -1.0], dtype=F64)).reshape(1, 2, 1, 2)
    with pytest.raises(ValueError, match=r"layer 'fc': Cholesky of F \+ λI failed .* increase the damping"):
        cv.damped_fisher({"fc": indefinite}, damping=0.5)


def test_shape_and_usage_errors_are_clear():
    data = random_data()
    fit = _fit("kfac", data)
    with pytest.raises(ValueError, match=r"layer 'a': features must be \(B, k_out, k_in\) = \(B, 3, 4\)"):
        fit.precondition({"a": torch.zeros(2, 4, 3)})
    with pytest.raises(ValueError, match=r"layer 'c' is not in this curvature"):
        fit.precondition({"c": torch.zeros(2, 3, 4)})
    with pytest.raises(ValueError, match=r"layer 'a': features must be a float tensor \(B, k_out, k_in\)"):
        fit.precondition({"a": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match=r"layer 'a': gradients .* must share \(B, T\)"):
        cv.KFACFitter().update({"a": torch.zeros(2, 3, 4)}, {"a": torch.zeros(2, 2, 3)})
    with pytest.raises(ValueError, match=r"layer 'a': mask must be a \(B, T\) = \(2, 3\) tensor"):
        cv.KFACFitter().update({"a": torch.zeros(2, 3, 4)}, {"a": torch.zeros(2, 3, 3)}, torch.ones(3, 2))
    fitter = cv.FisherFitter()
    fitter.update({"a": torch.zeros(2, 3, 4)})
    with pytest.raises(ValueError, match=r"layer 'a': \(k_out, k_in\) = \(3, 5\) differs"):
        fitter.update({"a": torch.zeros(2, 3, 5)})
    with pytest.raises(ValueError, match=r"every batch must have the layers \['a'\]"):
        fitter.update({"b": torch.zeros(2, 3, 4)})
    with pytest.raises(ValueError, match="same batch size B"):
        fitter.update({"a": torch.zeros(2, 3, 4), "b": torch.zeros(3, 1, 1)})
    with pytest.raises(ValueError, match=r"rank must be a positive int, got 0"):
        cv.LowRankFitter(0)
    with pytest.raises(ValueError, match=r"no examples seen: call update"):
        cv.KFACFitter().finalize()
    with pytest.raises(ValueError, match=r"EK-FAC needs the eigenbases of a fitted K-FAC .* got a 'fisher'"):
        cv.EKFACFitter(_fit("fisher", data))
    with pytest.raises(ValueError, match=r"every batch must have the layers \['a', 'b.proj'\]"):
        cv.EKFACFitter(fit).update({"a": data.features["a"]})


# ------------------------------------------------------------------ files


@pytest.mark.parametrize("method", ["identity", *METHODS])
def test_save_load_round_trip(method, tmp_path):
    data = random_data()
    fit = cv.identity({"a": (3, 4), "b.proj": (2, 5)}) if method == "identity" else _fit(method, data)
    path = tmp_path / "curvature.safetensors"
    fit.save(path)
    loaded = cv.Curvature.load(path)
    assert (loaded.method, loaded.dims, loaded.damping) == (fit.method, fit.dims, fit.damping)
    assert loaded.metadata == fit.metadata
    for name, x in fit.precondition(data.features).items():
        torch.testing.assert_close(loaded.precondition(data.features)[name], x, rtol=0, atol=0)
    if method == "kfac":  # a loaded K-FAC starts EK-FAC's second phase
        fitter = cv.EKFACFitter(loaded)
        fitter.update(data.features)
        _close(fitter.finalize().precondition(data.features)["a"], _fit("ekfac", data).precondition(data.features)["a"])


def test_load_rejects_foreign_and_incomplete_files(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match=r"foreign.safetensors: not an airtrace curvature file"):
        cv.Curvature.load(foreign)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"garbage.safetensors: not a readable safetensors file"):
        cv.Curvature.load(garbage)
    fit = _fit("kfac", random_data())
    incomplete = tmp_path / "incomplete.safetensors"
    tensors = {f"{n}/{k}": t for n, inv in fit.inverses.items() for k, t in inv.tensors().items()}
    del tensors["a/eigvecs_A"]
    save_checked(tensors, incomplete, cv.METADATA_KEY, fit.metadata)
    with pytest.raises(ValueError, match=r"incomplete.safetensors: missing tensor 'a/eigvecs_A'"):
        cv.Curvature.load(incomplete)
