"""project_factored: every backend against the float64 reference, plus the math itself."""

import pytest
import torch

from airtrace.ops.project_factored import project_factored, reference
from conftest import COMPILED_DTYPES, assert_close_to_reference

# (B, T, d_in, d_out, k_in, k_out): odd sizes, T=1, k=1, d not a multiple of 8.
SHAPES = [
    (1, 1, 5, 3, 1, 1),
    (2, 7, 13, 11, 4, 3),
    (3, 9, 33, 17, 8, 5),
    (2, 20, 40, 24, 16, 16),
]


def _inputs(shape, dtype, device, seed=0):
    B, T, d_in, d_out, k_in, k_out = shape
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, T, d_in, generator=g).to(dtype)
    G = torch.randn(B, T, d_out, generator=g).to(dtype)
    P_in = torch.randn(d_in, k_in, generator=g) / d_in**0.5
    P_out = torch.randn(d_out, k_out, generator=g) / d_out**0.5
    mask = torch.rand(B, T, generator=g) > 0.3
    return [t.to(device) for t in (A, G, P_in, P_out, mask)]


def _reference(A, G, P_in, P_out, mask=None):
    cpu64 = [None if t is None else t.to("cpu", torch.float64) for t in (A, G, P_in, P_out, mask)]
    return reference(*cpu64)


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
    assert_close_to_reference(out, _reference(A, G, P_in, P_out, mask), dtype)


def test_float_mask_weights_tokens(backend, device):
    A, G, P_in, P_out, _ = _inputs((2, 5, 9, 7, 3, 4), torch.float32, device)
    weights = torch.tensor([[0.0, 0.5, 1.0, 2.0, -1.0], [1.0, 1.0, 0.0, 0.0, 3.0]], device=device)
    out = project_factored(A, G, P_in, P_out, weights, backend=backend)
    assert_close_to_reference(out, _reference(A, G, P_in, P_out, weights), torch.float32)


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
