"""precondition: every backend against the float64 reference and the dense Kronecker-factored inverse."""

import importlib.util
import os
import shutil

import pytest
import torch

from airtrace import available
from airtrace.ops import bounds
from airtrace.ops.precondition import precondition, reference
from conftest import COMPILED_DTYPES, HALF_DTYPES, assert_within_bound, exceeds_bound

F64 = torch.float64
# (B, k_out, k_in): k = 1, k_in != k_out, 17, 33, 64, and k_out > 64 (several 64-row strips).
SHAPES = [(3, 1, 1), (2, 1, 5), (2, 6, 1), (2, 17, 33), (3, 33, 17), (2, 64, 64), (2, 70, 20)]
# Two or more of every tile of each backend's kernel:
# - cpu (csrc/cpu/precondition.cpp): register blocks of kRows = 6 (generic: 4) rows by kMaxVecs = 2 vectors of
#   kLanes = 16 / 8 / 4 floats (avx512 / avx2 / generic) -> 12+ row blocks, 3 / 5 / 9 column blocks; each sample
#   is 2.5 MFLOP > kParallelFlops = 2^20, so the 3 samples are shared by the threads.
# - cuda (csrc/cuda/precondition.cu): KT = 64 -> 2 strips of k_out and 2 column tiles of k_in; kDepth = 16 -> 5
#   steps; test_large_sides covers the opt-in shared memory and the spill paths, test_gpu.py more samples than
#   blocks (grid-stride).
# - triton (kernels/precondition.py): one program per sample holds whole tiles padded to 128 (no tiling inside).
# - torch: the reference has no tiles.
MULTI_TILE = (3, 70, 66)
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
    assert_within_bound(out, bounds.precondition(G_hat, Q_G, Q_A, Lam, DAMPING))


@pytest.mark.parametrize("dtype", COMPILED_DTYPES, ids=str)
def test_multi_tile_matches_float64_reference(backend, device, dtype):
    G_hat, Q_G, Q_A, Lam = _inputs(MULTI_TILE, dtype, device, seed=2)
    out = precondition(G_hat, Q_G, Q_A, Lam, DAMPING, backend=backend)
    assert_within_bound(out, bounds.precondition(G_hat, Q_G, Q_A, Lam, DAMPING))


def _half(t, dtype):
    return t.to(dtype).float()


# Three precision bugs a kernel could have, emulated in torch; float32 math everywhere else.
MUTATIONS = {
    # the rotated intermediate Q_G^T G Q_A kept in the 16-bit input dtype
    "16-bit intermediates": lambda G, Q_G, Q_A, Lam, d: Q_G @ (_half(Q_G.T @ G.float() @ Q_A, d) / (Lam + DAMPING))
    @ Q_A.T,
    # float32 promised, the result rounded to 16 bits
    "16-bit output": lambda G, Q_G, Q_A, Lam, d: _half(reference(G, Q_G, Q_A, Lam, DAMPING), d),
    # the eigenbases rounded to the 16-bit input dtype
    "16-bit projection matrices": lambda G, Q_G, Q_A, Lam, d: reference(G, _half(Q_G, d), _half(Q_A, d), Lam, DAMPING),
}


@pytest.mark.parametrize("shape", SHAPES[3:] + [MULTI_TILE], ids=str)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("bug", MUTATIONS)
def test_bound_rejects_precision_bugs(bug, dtype, shape):
    """The bound fails a kernel with the bug on the shapes the backends are checked on (not the k = 1 ones, whose
    1 x 1 eigenbases are exactly +-1)."""
    G_hat, Q_G, Q_A, Lam = _inputs(shape, dtype, "cpu")
    expected = bounds.precondition(G_hat, Q_G, Q_A, Lam, DAMPING)
    assert_within_bound(reference(G_hat, Q_G, Q_A, Lam, DAMPING), expected)  # the bug-free float32 computation
    assert exceeds_bound(MUTATIONS[bug](G_hat, Q_G, Q_A, Lam, dtype), expected)


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
    # The dense inverse is of the float32-rounded Q_G, Q_A, orthonormal only to about 1e-7: the formula's value
    # differs from it by that much relative to the result on every backend, float64 included.
    assert (out.cpu().double() - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_reference_is_exact_in_float64():
    G_hat, Q_G, Q_A, Lam = _inputs((2, 4, 3), F64, "cpu")
    Q_G, Q_A, Lam = _factors(4, 3, dtype=F64)
    out = precondition(G_hat, Q_G, Q_A, Lam, DAMPING, backend="torch")
    expected = (G_hat.reshape(2, -1) @ _dense_inverse(Q_G, Q_A, Lam, DAMPING).T).reshape(2, 4, 3)
    assert out.dtype == F64
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_float64_auto_runs_the_float64_reference(monkeypatch):
    G_hat, Q_G, Q_A, Lam = _inputs((2, 3, 4), F64, "cpu")
    expected = reference(G_hat, Q_G.double(), Q_A.double(), Lam.double(), DAMPING)
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
    assert_within_bound(out, bounds.precondition(G_hat, Q_G, Q_A, Lam, 0.0))


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
    assert_within_bound(out, bounds.precondition(G_hat, Q_G, Q_A, Lam, DAMPING))


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
