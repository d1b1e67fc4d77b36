"""project_factored: every backend against the float64 reference, plus the math itself."""

import pytest
import torch

from airtrace.ops import bounds
from airtrace.ops.project_factored import project_factored, reference
from conftest import (COMPILED_DTYPES, HALF_DTYPES, assert_within_bound, exceeds_bound, few_triton_programs)

# (B, T, d_in, d_out, k_in, k_out): odd sizes, T=1, k=1, d not a multiple of 8.
SHAPES = [
    (1, 1, 5, 3, 1, 1),
    (2, 7, 13, 11, 4, 3),
    (3, 9, 33, 17, 8, 5),
    (2, 20, 40, 24, 16, 16),
]
# Two or more of every tile of every backend's kernel:
# - cpu (csrc/cpu/project_factored.cpp): kTileTokens = 64 -> 3 token tiles; the 9 (sample, tile) items split over
#   the threads so that a sample straddles two threads' ranges; kGroupTokens = 24 -> 3 token groups per tile;
#   micro-kernel panels of kMaxPanel = 64 columns -> k_in = 65 and k_out = 66 take 2 panels each.
# - cuda (csrc/cuda/project_factored.cu): KT = 64 -> 2 x 2 output tiles; kTokens = 64 -> 3 chunks; kDepth = 16 ->
#   3 steps over d_in, d_out; T split over 3 blocks (atomic adds). test_gpu.py adds B = 70 (2 chunks per block)
#   and B = 140 (T not split).
# - triton (kernels/project_factored.py) with PROGRAMS = 24: BLOCK_KI = BLOCK_KO = 64 -> 2 x 2 tiles; BLOCK_D = 32
#   -> 2 steps; BLOCK_T = 32 and 2 token splits of 96 -> 3 token blocks per program, partial sums merged.
# - torch: the reference has no tiles.
MULTI_TILE = (3, 130, 40, 36, 65, 66)
TRITON_PROGRAMS = 24


def _inputs(shape, dtype, device, seed=0):
    B, T, d_in, d_out, k_in, k_out = shape
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, T, d_in, generator=g).to(dtype)
    G = torch.randn(B, T, d_out, generator=g).to(dtype)
    P_in = torch.randn(d_in, k_in, generator=g) / d_in**0.5
    P_out = torch.randn(d_out, k_out, generator=g) / d_out**0.5
    mask = torch.rand(B, T, generator=g) > 0.3
    return [t.to(device) for t in (A, G, P_in, P_out, mask)]


def test_reference_equals_projected_per_sample_gradient():
    """out[b] = P_out^T (sum_t m_t G_t^T A_t) P_in, the projection of the explicit weight gradient."""
    A, G, P_in, P_out, mask = _inputs((3, 6, 7, 5, 3, 2), torch.float64, "cpu")
    P_in, P_out = P_in.double(), P_out.double()
    out = reference(A, G, P_in, P_out, mask)
    for b in range(3):
        grad = sum(float(mask[b, t]) * torch.outer(G[b, t], A[b, t]) for t in range(6))  # (d_out, d_in)
        torch.testing.assert_close(out[b], P_out.T @ grad @ P_in, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", COMPILED_DTYPES, ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_matches_float64_reference(backend, device, shape, dtype, masked):
    A, G, P_in, P_out, mask = _inputs(shape, dtype, device)
    mask = mask if masked else None
    out = project_factored(A, G, P_in, P_out, mask, backend=backend)
    assert out.dtype == torch.float32 and out.device.type == device.type
    assert_within_bound(out, bounds.project_factored(A, G, P_in, P_out, mask))


@pytest.mark.parametrize("dtype", COMPILED_DTYPES, ids=str)
def test_multi_tile_matches_float64_reference(backend, device, dtype, monkeypatch):
    if backend == "triton":
        few_triton_programs(monkeypatch, "project_factored", TRITON_PROGRAMS)
    A, G, P_in, P_out, mask = _inputs(MULTI_TILE, dtype, device, seed=1)
    out = project_factored(A, G, P_in, P_out, mask, backend=backend)
    assert_within_bound(out, bounds.project_factored(A, G, P_in, P_out, mask))


def _half(t, dtype):
    return t.to(dtype).float()


# Three precision bugs a kernel could have, emulated in torch; float32 math everywhere else.
MUTATIONS = {
    # the projections A P_in, G P_out kept in the 16-bit input dtype
    "16-bit intermediates": lambda A, G, P_in, P_out, m, d: (
        (_half(G.float() @ P_out, d) * m[:, :, None]).transpose(1, 2) @ _half(A.float() @ P_in, d)),
    # float32 promised, the result rounded to 16 bits
    "16-bit output": lambda A, G, P_in, P_out, m, d: _half(reference(A, G, P_in, P_out, m), d),
    # P_in, P_out rounded to the 16-bit input dtype
    "16-bit projection matrices": lambda A, G, P_in, P_out, m, d: reference(A, G, _half(P_in, d), _half(P_out, d), m),
}


@pytest.mark.parametrize("shape", SHAPES[1:] + [MULTI_TILE], ids=str)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("bug", MUTATIONS)
def test_bound_rejects_precision_bugs(bug, dtype, shape):
    """The bound fails a kernel with the bug on the shapes the backends are checked on (SHAPES[0] has a single
    output element, which a rounding may leave exact)."""
    A, G, P_in, P_out, mask = _inputs(shape, dtype, "cpu")
    expected = bounds.project_factored(A, G, P_in, P_out, mask)
    assert_within_bound(reference(A, G, P_in, P_out, mask), expected)  # the bug-free float32 computation passes
    assert exceeds_bound(MUTATIONS[bug](A, G, P_in, P_out, mask.float(), dtype), expected)


def test_float_mask_weights_tokens(backend, device):
    A, G, P_in, P_out, _ = _inputs((2, 5, 9, 7, 3, 4), torch.float32, device)
    weights = torch.tensor([[0.0, 0.5, 1.0, 2.0, -1.0], [1.0, 1.0, 0.0, 0.0, 3.0]], device=device)
    out = project_factored(A, G, P_in, P_out, weights, backend=backend)
    assert_within_bound(out, bounds.project_factored(A, G, P_in, P_out, weights))


def test_fully_masked_sample_is_zero(backend, device):
    A, G, P_in, P_out, mask = _inputs((2, 4, 6, 5, 2, 3), torch.float32, device)
    mask[1] = False
    out = project_factored(A, G, P_in, P_out, mask, backend=backend)
    assert torch.count_nonzero(out[1]) == 0
    assert torch.count_nonzero(out[0]) > 0


def test_float64_reference_backend_keeps_float64():
    A, G, P_in, P_out, _ = _inputs((2, 3, 4, 5, 2, 2), torch.float64, "cpu")
    assert project_factored(A, G, P_in, P_out, backend="torch").dtype == torch.float64


@pytest.mark.parametrize("B,T", [(0, 4), (3, 0)])
def test_empty_batch_gives_zeros(B, T):
    out = project_factored(torch.randn(B, T, 6), torch.randn(B, T, 5), torch.randn(6, 2), torch.randn(5, 3))
    assert out.shape == (B, 3, 2) and torch.count_nonzero(out) == 0


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(A=torch.randn(2, 3)), "A must be 3-D"),
        (dict(G=torch.randn(2, 4, 5)), r"G must be \(B, T, d_out\)"),
        (dict(G=torch.randn(2, 3, 5, dtype=torch.float16)), "G must have A's dtype"),
        (dict(P_in=torch.randn(7, 2)), r"P_in must be \(d_in=6"),
        (dict(P_out=torch.randn(4, 3)), r"P_out must be \(d_out=5"),
        (dict(mask=torch.ones(3, 2)), r"mask must be a \(B, T\)"),
        (dict(A=torch.randint(0, 3, (2, 3, 6))), "A must be a float32"),
    ],
)
def test_bad_input_names_the_argument(change, message):
    args = dict(A=torch.randn(2, 3, 6), G=torch.randn(2, 3, 5), P_in=torch.randn(6, 2), P_out=torch.randn(5, 3), mask=None)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        project_factored(**args)


def test_compiled_backend_rejects_float64():
    from airtrace import available

    if not available("cpu"):
        pytest.skip("backend 'cpu' not built")
    A, G, P_in, P_out, _ = _inputs((1, 2, 3, 3, 1, 1), torch.float64, "cpu")
    with pytest.raises(ValueError, match="backend 'cpu' supports float32, bfloat16 and float16"):
        project_factored(A, G, P_in, P_out, backend="cpu")
