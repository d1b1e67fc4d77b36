"""precondition: every backend against the float64 reference and the dense Kronecker-factored inverse."""

import importlib.util
import os
import shutil

import pytest
import torch

from airtrace import available
from airtrace.ops.precondition import precondition, reference
from conftest import COMPILED_DTYPES, TOLERANCE, assert_close_to_reference

F64 = torch.float64
# (B, k_out, k_in): k = 1, k_in != k_out, 17, 33, 64, and k_out > 64 (several 64-row strips).
SHAPES = [(3, 1, 1), (2, 1, 5), (2, 6, 1), (2, 17, 33), (3, 33, 17), (2, 64, 64), (2, 70, 20)]
DAMPING = 0.01


def _factors(k_out, k_in, seed=0, dtype=torch.float32):
    """Orthonormal Q_G, Q_A and a spectrum Λ >= 0 decaying over three decades."""
    g = torch.Generator().manual_seed(seed)
    Q_G = torch.linalg.qr(torch.randn(k_out, k_out, generator=g, dtype=F64))[0]
    Q_A = torch.linalg.qr(torch.randn(k_in, k_in, generator=g, dtype=F64))[0]
    Lam = torch.rand(k_out, k_in, generator=g, dtype=F64) * torch.logspace(0, -3, k_in, dtype=F64)
    return Q_G.to(dtype), Q_A.to(dtype), Lam.to(dtype)


def _inputs(shape, dtype, device, seed=0):
    B, k_out, k_in = shape
    G_hat = torch.randn(B, k_out, k_in, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return [t.to(device) for t in (G_hat, *_factors(k_out, k_in, seed))]


def _reference(G_hat, Q_G, Q_A, Lam, damping=DAMPING):
    return reference(*(t.to("cpu", F64) for t in (G_hat, Q_G, Q_A, Lam)), damping)


def _dense_inverse(Q_G, Q_A, Lam, damping):
    """(Q diag(vec Λ) Qᵀ + λI)⁻¹ with Q = kron(Q_G, Q_A), as an explicit (n, n) float64 matrix."""
    Q = torch.kron(Q_G.to(F64), Q_A.to(F64))
    n = Q.shape[0]
    return torch.linalg.inv(Q @ torch.diag(Lam.to(F64).reshape(-1)) @ Q.T + damping * torch.eye(n, dtype=F64))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", COMPILED_DTYPES, ids=str)
def test_matches_float64_reference(backend, device, shape, dtype):
    G_hat, Q_G, Q_A, Lam = _inputs(shape, dtype, device)
    out = precondition(G_hat, Q_G, Q_A, Lam, DAMPING, backend=backend)
    assert out.dtype == torch.float32 and out.device.type == device.type and out.shape == shape
    assert_close_to_reference(out, _reference(G_hat, Q_G, Q_A, Lam), dtype)


@pytest.mark.parametrize("method", ["ekfac", "kfac"])
def test_equals_dense_kronecker_inverse(backend, device, method):
    """EK-FAC: (Q diag(vec Λ) Qᵀ + λI)⁻¹ vec(Ĝ); K-FAC (Λ = e_G e_Aᵀ): (S_G ⊗ S_A + λI)⁻¹ vec(Ĝ)."""
    B, k_out, k_in = 3, 5, 7
    G_hat, Q_G, Q_A, Lam = _inputs((B, k_out, k_in), torch.float32, "cpu", seed=4)
    if method == "kfac":
        g = torch.Generator().manual_seed(5)
        e_G, e_A = torch.rand(k_out, generator=g), torch.rand(k_in, generator=g)
        Lam = torch.outer(e_G, e_A)
        S_G = Q_G.double() @ torch.diag(e_G.double()) @ Q_G.double().T
        S_A = Q_A.double() @ torch.diag(e_A.double()) @ Q_A.double().T
        inverse = torch.linalg.inv(torch.kron(S_G, S_A) + 0.05 * torch.eye(k_out * k_in, dtype=F64))
    else:
        inverse = _dense_inverse(Q_G, Q_A, Lam, 0.05)
    expected = (G_hat.double().reshape(B, -1) @ inverse.T).reshape(B, k_out, k_in)
    dtype = F64 if backend == "torch" else torch.float32
    args = [t.to(device, dtype) for t in (G_hat, Q_G, Q_A, Lam)]
    out = precondition(*args, 0.05, backend=backend)
    # Q_G, Q_A are orthonormal to fp32 round-off only, hence the float32 tolerance for every backend.
    assert (out.cpu().double() - expected).abs().max() <= TOLERANCE[torch.float32] * expected.abs().max()


def test_reference_is_exact_in_float64():
    G_hat, Q_G, Q_A, Lam = _inputs((2, 4, 3), F64, "cpu")
    Q_G, Q_A, Lam = _factors(4, 3, dtype=F64)
    out = precondition(G_hat, Q_G, Q_A, Lam, DAMPING, backend="torch")
    expected = (G_hat.reshape(2, -1) @ _dense_inverse(Q_G, Q_A, Lam, DAMPING).T).reshape(2, 4, 3)
    assert out.dtype == F64
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_float64_auto_runs_the_float64_reference(monkeypatch):
    G_hat, Q_G, Q_A, Lam = _inputs((2, 3, 4), F64, "cpu")
    expected = _reference(G_hat, Q_G, Q_A, Lam)
    out = precondition(G_hat, Q_G, Q_A, Lam, DAMPING)
    assert out.dtype == F64
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    monkeypatch.setenv("AIRTRACE_BACKEND", "cpu")  # names a compiled backend, which float64 cannot use
    torch.testing.assert_close(precondition(G_hat, Q_G, Q_A, Lam, DAMPING), expected, rtol=1e-12, atol=1e-12)


def test_compiled_backend_rejects_float64():
    if not available("cpu"):
        pytest.skip("backend 'cpu' not built")
    G_hat, Q_G, Q_A, Lam = _inputs((1, 2, 2), F64, "cpu")
    with pytest.raises(ValueError, match="backend 'cpu' supports float32, bfloat16 and float16"):
        precondition(G_hat, Q_G, Q_A, Lam, DAMPING, backend="cpu")


def test_zero_damping_and_noncontiguous_input(backend, device):
    G_hat, Q_G, Q_A, Lam = _inputs((2, 6, 5), torch.float32, device)
    G_t = G_hat.transpose(1, 2).contiguous().transpose(1, 2)  # same values, column-major storage
    assert not G_t.is_contiguous()
    Lam = Lam + 0.5
    out = precondition(G_t, Q_G, Q_A, Lam, 0.0, backend=backend)
    assert_close_to_reference(out, _reference(G_hat, Q_G, Q_A, Lam, 0.0), torch.float32)


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 3), (2, 3, 0)], ids=str)
def test_empty_gives_zeros(backend, device, shape):
    B, k_out, k_in = shape
    G_hat, Q_G, Q_A, Lam = (torch.randn(*s, device=device) for s in (shape, (k_out, k_out), (k_in, k_in), (k_out, k_in)))
    out = precondition(G_hat, Q_G, Q_A, Lam.abs(), DAMPING, backend=backend)
    assert out.shape == shape and out.dtype == torch.float32 and out.device.type == device.type


@pytest.mark.parametrize("shape", [(2, 100, 130), (2, 256, 256)], ids=["cuda-optin-smem", "cuda-spill"])
def test_large_sides(backend, device, shape):
    """Sizes beyond the CUDA kernel's default shared memory (opt-in) and beyond any block's (spill)."""
    if backend == "triton":
        pytest.skip("backend 'triton' holds whole tiles: k_out, k_in <= 128 (see test_triton_rejects_large_sides)")
    G_hat, Q_G, Q_A, Lam = _inputs(shape, torch.float32, device)
    out = precondition(G_hat, Q_G, Q_A, Lam, DAMPING, backend=backend)
    assert_close_to_reference(out, _reference(G_hat, Q_G, Q_A, Lam), torch.float32)


def test_triton_rejects_large_sides():
    if not available("triton"):
        pytest.skip("backend 'triton' unavailable")
    from airtrace.kernels.precondition import MAX_SIDE

    G_hat, Q_G, Q_A, Lam = _inputs((1, 2, MAX_SIDE + 1), torch.float32, "cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=f"backend 'triton' supports k_out, k_in <= {MAX_SIDE}; use backend='cuda'"):
        precondition(G_hat, Q_G, Q_A, Lam, DAMPING, backend="triton")


def _args(**change):
    args = dict(G_hat=torch.randn(2, 3, 4), Q_G=torch.eye(3), Q_A=torch.eye(4), Lam=torch.rand(3, 4), damping=0.1)
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(G_hat=torch.randn(3, 4)), "G_hat must be 3-D"),
        (dict(G_hat=torch.randint(0, 3, (2, 3, 4))), "G_hat must be a float32"),
        (dict(Q_G=torch.eye(4)), r"Q_G must be \(3, 3\) for G_hat \(B, k_out, k_in\) = \(2, 3, 4\)"),
        (dict(Q_A=torch.eye(3)), r"Q_A must be \(4, 4\) for G_hat"),
        (dict(Lam=torch.rand(4, 3)), r"Lam must be \(3, 4\) for G_hat"),
        (dict(Q_A=torch.ones(4)), "Q_A must be 2-D"),
        (dict(damping=-0.1), "damping must be a finite number >= 0"),
        (dict(damping=float("nan")), "damping must be a finite number >= 0"),
        (dict(damping=float("inf")), "damping must be a finite number >= 0"),
        (dict(damping=True), "damping must be a finite number >= 0"),
        (dict(damping="0.1"), "damping must be a finite number >= 0"),
        (dict(Lam=torch.zeros(3, 4), damping=0.0), r"Lam \+ damping must be > 0 elementwise, got 12 of 12"),
        (dict(Lam=torch.full((3, 4), -0.5)), r"Lam \+ damping must be > 0 elementwise"),
        (dict(Lam=torch.tensor([[float("nan"), 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]])), "1 of 12 entries <= 0 or NaN"),
    ],
)
def test_bad_input_names_the_argument(change, message):
    with pytest.raises(ValueError, match=message):
        precondition(**_args(**change))


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        precondition(**_args(), backend="tpu")


def test_extensions_export_precondition():
    from airtrace import _C

    assert callable(_C.precondition)
    if shutil.which("nvcc") is None and os.environ.get("AIRTRACE_REQUIRE_CUDA_BUILD") != "1":
        pytest.skip("nvcc not found: the CUDA extension is not expected here")
    assert importlib.util.find_spec("airtrace._C_cuda") is not None
    from airtrace import _C_cuda

    assert callable(_C_cuda.precondition)
