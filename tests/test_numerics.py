"""Kernels on hostile numbers and tensors: cosines at any norm, NaN/Inf rows and queries, overflowing scores, indices
and preconditioning, the same on every backend; meta tensors; merge_topk's input checks."""

from __future__ import annotations

import pytest
import torch

from airtrace import digest, group_pool_scores, merge_topk, precondition, project_dense, project_factored, score_topk


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cosines_are_right_for_any_norm_in_range(backend, device, dtype):
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([1e-30, 1e-12, 1.0, 1e10, 1e19, 1e25, 1e35])
    X = (torch.randn(len(scales), 8, generator=g) * scales[:, None]).to(dtype)
    Q = torch.randn(2, 8, generator=g) * torch.tensor([[1e30], [1e-10]])
    X64, Q64 = X.double(), Q.double()
    unit = lambda t: t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)  # noqa: E731 - score_topk's definition
    expected = unit(Q64) @ unit(X64).T
    values, indices = score_topk(Q.to(device), X.to(device), len(scales), normalize=True, backend=backend)
    got = torch.zeros_like(expected).scatter_(1, indices.cpu(), values.cpu().double())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("where", ["X", "Q"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_inf_rows_and_queries_are_refused_on_every_backend(backend, device, where, value):
    Q, X = torch.randn(3, 4), torch.randn(6, 4)
    (X if where == "X" else Q)[1 if where == "Q" else 4, 2] = value
    what = r"6 rows \(the first: row 4\)" if where == "X" else r"3 queries \(the first: query 1\)"
    for normalize in (False, True):
        with pytest.raises(ValueError, match=rf"score_topk: {where} has NaN/Inf values in 1 of its {what}; a "
                                             r"non-finite (row|query) has no rank"):
            score_topk(Q.to(device), X.to(device), 6, normalize, backend=backend)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_scores_that_overflow_are_refused_on_every_backend(backend, device):
    Q, X = torch.full((1, 4), 1e30), torch.randn(5, 4) * 1e30  # finite inputs, inner products beyond float32
    with pytest.raises(ValueError, match=r"score_topk: query 0 has scores that are NaN/Inf although Q and X are "
                                         r"finite"):
        score_topk(Q.to(device), X.to(device), 3, backend=backend)
    values, _ = score_topk(Q.to(device), X.to(device), 3, normalize=True, backend=backend)  # cosines are fine
    assert values.isfinite().all()


def test_index_offsets_that_overflow_int64_are_refused():
    Q, X = torch.randn(2, 3), torch.randn(5, 3)
    assert score_topk(Q, X, 2, index_offset=2**63 - 5)[1].min() >= 2**63 - 5  # the last index is 2^63 - 1
    with pytest.raises(ValueError, match=r"index_offset = 9223372036854775804 numbers 5 rows up to "
                                         r"9223372036854775808, past the int64 maximum"):
        score_topk(Q, X, 2, index_offset=2**63 - 4)
    with pytest.raises(ValueError, match=r"row_offset = .* past the int64 maximum"):
        project_dense(torch.randn(2, 3), 4, 0, row_offset=2**63 - 2)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_precondition_never_returns_inf(backend, device):
    G = torch.ones(2, 3, 4, device=device)
    Q_G, Q_A = torch.eye(3, device=device), torch.eye(4, device=device)
    Lam = torch.rand(3, 4, generator=torch.Generator().manual_seed(0)).to(device)
    Lam[1, 2] = 0.0  # an eigenvalue of 0 with a damping too small for float32
    with pytest.raises(ValueError, match=r"precondition: the result overflows torch.float32.*Fix: raise damping"):
        precondition(G, Q_G, Q_A, Lam, 1e-40, backend=backend)
    assert precondition(G, Q_G, Q_A, Lam, 1e-3, backend=backend).isfinite().all()


# ----------------------------------------------------------------------------- meta tensors


def test_every_op_gives_meta_results_on_meta_tensors():
    m = dict(device="meta")
    values, indices = score_topk(torch.empty(3, 8, **m), torch.empty(100, 8, **m), 5, True)
    assert values.shape == indices.shape == (3, 5) and values.is_meta and indices.dtype == torch.int64
    merged = merge_topk([values, values], [indices, indices], 4)
    assert merged[0].shape == (3, 4) and merged[0].is_meta
    out = project_factored(torch.empty(2, 5, 6, **m), torch.empty(2, 5, 7, **m), torch.empty(6, 3, **m),
                           torch.empty(7, 2, **m))
    assert out.shape == (2, 2, 3) and out.is_meta
    out = project_dense(torch.empty(4, 9, **m), 16, 0)
    assert out.shape == (4, 16) and out.is_meta
    out = precondition(torch.empty(2, 3, 4, **m), torch.empty(3, 3, **m), torch.empty(4, 4, **m),
                       torch.empty(3, 4, **m), 0.1)
    assert out.shape == (2, 3, 4) and out.is_meta
    out = group_pool_scores(torch.empty(2, 8, **m), torch.empty(10, 8, **m), torch.tensor([0, 3, 5], **m),
                            torch.empty(5, dtype=torch.int64, **m))
    assert out.shape == (2, 2) and out.is_meta
    assert digest(torch.empty(4, 3, **m)).shape == (4, 2)


def test_merge_topk_validates_its_inputs():
    v, i = torch.randn(2, 3), torch.tensor([[0, 1, 2], [3, 4, 5]])
    bad = [
        (([v], [i.float()]), ValueError, r"indices\[0\] must be int64"),
        (([v.long()], [i]), ValueError, r"values\[0\] must be a float tensor"),
        (([v, v.double()], [i, i]), ValueError, r"values\[1\] must be a float tensor of values\[0\]'s dtype"),
        (([v.masked_fill(v > 0, float("nan"))], [i]), ValueError, r"values\[0\] holds NaN scores"),
        (([v], [i - 5]), ValueError, r"indices\[0\] holds indices below -1"),
        (([v], [i.to("meta")]), ValueError, r"must be on values\[0\]'s device cpu"),
        ((v, i), TypeError, r"values must be a list of \(q, k_s\) tensors"),
        (([v.tolist()], [i]), TypeError, r"values\[0\] and indices\[0\] must be tensors"),
    ]
    for (values, indices), error, message in bad:
        with pytest.raises(error, match=message):
            merge_topk(values, indices, 2)
