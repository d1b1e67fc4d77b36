"""torch.library custom ops (torch.ops.airtrace.*): opcheck on CPU, values equal to the airtrace.ops functions, torch.compile."""

from __future__ import annotations

import importlib

import pytest
import torch

import airtrace  # noqa: F401  (registers torch.ops.airtrace.*)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _factored(dtype=torch.float32):
    g = _gen(1)
    A, G = torch.randn(3, 5, 6, generator=g, dtype=dtype), torch.randn(3, 5, 4, generator=g, dtype=dtype)
    mask = (torch.rand(3, 5, generator=g) > 0.3).to(dtype)
    return A, G, torch.randn(6, 3, generator=g), torch.randn(4, 2, generator=g), mask


def _precondition():
    g = _gen(2)
    Q_G = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0].float()
    Q_A = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))[0].float()
    return torch.randn(5, 3, 4, generator=g), Q_G, Q_A, torch.rand(3, 4, generator=g) + 0.1


def _group_pool():
    g = _gen(3)
    offsets = torch.tensor([0, 2, 2, 5, 6])  # group 1 is empty
    members = torch.tensor([0, 3, 1, 2, 3, 5])
    return torch.randn(2, 4, generator=g), torch.randn(6, 4, generator=g), offsets, members


CASES = {
    "project_factored": (lambda: _factored(), {}),
    "project_factored_bf16_no_mask": (lambda: (*_factored(torch.bfloat16)[:4], None), {}),
    "project_dense": (lambda: (torch.randn(3, 17, generator=_gen(4)), 5, 7), {"kind": "gaussian", "row_offset": 3}),
    "project_sparse": (lambda: (torch.randn(3, 17, generator=_gen(7)), 5, 3, 7), {"row_offset": 3}),
    "score_topk": (lambda: (torch.randn(2, 6, generator=_gen(5)), torch.randn(9, 6, generator=_gen(6)), 4), {}),
    "score_topk_cosine": (lambda: (torch.randn(2, 6, generator=_gen(5)), torch.randn(3, 6, generator=_gen(6)), 5),
                          {"normalize": True, "index_offset": 10}),
    "precondition": (lambda: (*_precondition(), 0.05), {}),
    "group_pool_scores": (lambda: _group_pool(), {}),
}


def _op_name(case: str) -> str:
    return next(name for name in ("project_factored", "project_dense", "project_sparse", "score_topk", "precondition",
                                  "group_pool_scores") if case.startswith(name))


@pytest.mark.parametrize("case", sorted(CASES))
def test_opcheck_and_values_equal_airtrace_ops(case):
    make, kwargs = CASES[case]
    name = _op_name(case)
    custom = getattr(torch.ops.airtrace, name)
    torch.library.opcheck(custom, make(), kwargs)
    got = custom(*make(), **kwargs)
    want = getattr(importlib.import_module(f"airtrace.ops.{name}"), name)(*make(), **kwargs)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g, w)


def test_group_pool_scores_against_a_float64_loop():
    queries, train, offsets, members = _group_pool()
    got = torch.ops.airtrace.group_pool_scores(queries.double(), train.double(), offsets, members)
    for g in range(4):
        rows = members[offsets[g]: offsets[g + 1]]
        s = queries.double() @ train.double()[rows].T
        want = (torch.softmax(s.abs(), dim=1) * s).sum(dim=1) if len(rows) else torch.zeros(2, dtype=torch.float64)
        torch.testing.assert_close(got[:, g], want, rtol=1e-12, atol=1e-12)


def test_bad_arguments_raise_the_ops_errors():
    A, G, P_in, P_out, _ = _factored()
    with pytest.raises(ValueError, match=r"P_in must be \(d_in=6, k_in>=1\)"):
        torch.ops.airtrace.project_factored(A, G, P_out, P_out)
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        torch.ops.airtrace.precondition(*_precondition(), -1.0)


def test_compile_fullgraph_equals_eager():
    """One graph through dynamo + AOT autograd with the fake implementations, no graph break."""
    A, G, P_in, P_out, mask = _factored()
    X = torch.randn(7, 6, generator=_gen(8))

    def pipeline(A, G, P_in, P_out, mask, X):
        features = torch.ops.airtrace.project_factored(A, G, P_in, P_out, mask)  # (3, 2, 3)
        flat = features.reshape(features.shape[0], -1)  # (3, 6)
        values, indices = torch.ops.airtrace.score_topk(flat, X, 4)
        return values * 2, indices

    torch._dynamo.reset()
    compiled = torch.compile(pipeline, fullgraph=True, backend="aot_eager")
    got = compiled(A, G, P_in, P_out, mask, X)
    want = pipeline(A, G, P_in, P_out, mask, X)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.slow
def test_compile_with_inductor_equals_eager():
    """The default backend (inductor, a C++ build: about a minute on 2 busy cores)."""
    A, G, P_in, P_out, mask = _factored()
    Q_G, Q_A, Lam = _precondition()[1:]
    G_hat = torch.randn(3, 3, 4, generator=_gen(9))

    def pipeline(A, G, P_in, P_out, mask, G_hat):
        features = torch.ops.airtrace.project_factored(A, G, P_in, P_out, mask) + 1.0
        return features, torch.ops.airtrace.precondition(G_hat, Q_G, Q_A, Lam, 0.1)

    torch._dynamo.reset()
    got = torch.compile(pipeline, fullgraph=True)(A, G, P_in, P_out, mask, G_hat)
    want = pipeline(A, G, P_in, P_out, mask, G_hat)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
