"""The public kernels as ``torch.library`` custom ops: ``torch.ops.airtrace.*``.

Importing this module (``import airtrace`` does) registers

- ``torch.ops.airtrace.project_factored(A, G, P_in, P_out, mask=None, backend="auto")``
- ``torch.ops.airtrace.project_dense(X, k, seed, kind="rademacher", row_offset=0, backend="auto")``
- ``torch.ops.airtrace.score_topk(Q, X, topk, normalize=False, index_offset=0, backend="auto")``
- ``torch.ops.airtrace.precondition(G_hat, Q_G, Q_A, Lam, damping, backend="auto")``
- ``torch.ops.airtrace.group_pool_scores(queries, train, offsets, members, backend="auto")``

Each calls the function of the same name in :mod:`airtrace.ops` (same
arguments, checks and backends; ``project_dense`` takes one (B, p) tensor
here, not a list of blocks) and has a fake (meta) implementation that
computes the output shapes and dtypes, so the ops trace under
``torch.compile(fullgraph=True)`` and ``torch.export`` without a graph
break. They are not differentiable (features and scores are computed from
captured gradients, not trained through).

Output dtypes follow the ops: float32 for float32 / bfloat16 / float16
inputs, float64 for float64 inputs; indices are int64.
"""

from __future__ import annotations

from typing import Optional

import torch

from airtrace import ops
from airtrace.ref.project import accumulation_dtype

__all__ = ["group_pool_scores", "precondition", "project_dense", "project_factored", "score_topk"]

_NAMESPACE = "airtrace"


def _promoted(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    return accumulation_dtype(torch.promote_types(a.dtype, b.dtype))


@torch.library.custom_op(f"{_NAMESPACE}::project_factored", mutates_args=())
def project_factored(A: torch.Tensor, G: torch.Tensor, P_in: torch.Tensor, P_out: torch.Tensor,
                     mask: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """``out[b] = sum_t m[b,t] (G[b,t] P_out)^T (A[b,t] P_in)``: (B, T, d_in), (B, T, d_out) -> (B, k_out, k_in).

    See :func:`airtrace.ops.project_factored`.
    """
    return ops.project_factored(A, G, P_in, P_out, mask, backend=backend)


@project_factored.register_fake
def _(A, G, P_in, P_out, mask=None, backend="auto"):
    return A.new_empty((A.shape[0], P_out.shape[1], P_in.shape[1]), dtype=accumulation_dtype(A.dtype))


@torch.library.custom_op(f"{_NAMESPACE}::project_dense", mutates_args=())
def project_dense(X: torch.Tensor, k: int, seed: int, kind: str = "rademacher", row_offset: int = 0,
                  backend: str = "auto") -> torch.Tensor:
    """``out = X @ R[row_offset : row_offset + p]``, R hashed from (seed, row, col): (B, p) -> (B, k).

    See :func:`airtrace.ops.project_dense`.
    """
    return ops.project_dense(X, k, seed, kind, row_offset=row_offset, backend=backend)


@project_dense.register_fake
def _(X, k, seed, kind="rademacher", row_offset=0, backend="auto"):
    return X.new_empty((X.shape[0], k), dtype=accumulation_dtype(X.dtype))


@torch.library.custom_op(f"{_NAMESPACE}::score_topk", mutates_args=())
def score_topk(Q: torch.Tensor, X: torch.Tensor, topk: int, normalize: bool = False, index_offset: int = 0,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``s[i, j] = Q[i] . X[j]`` (or cosine) per query: (q, k), (n, k) -> values, indices (q, topk).

    See :func:`airtrace.ops.score_topk`.
    """
    return ops.score_topk(Q, X, topk, normalize, index_offset=index_offset, backend=backend)


@score_topk.register_fake
def _(Q, X, topk, normalize=False, index_offset=0, backend="auto"):
    values = Q.new_empty((Q.shape[0], topk), dtype=_promoted(Q, X))
    return values, Q.new_empty((Q.shape[0], topk), dtype=torch.int64)


@torch.library.custom_op(f"{_NAMESPACE}::precondition", mutates_args=())
def precondition(G_hat: torch.Tensor, Q_G: torch.Tensor, Q_A: torch.Tensor, Lam: torch.Tensor, damping: float,
                 backend: str = "auto") -> torch.Tensor:
    """``out[b] = Q_G [(Q_G^T G_hat[b] Q_A) / (Lam + damping)] Q_A^T``: (B, k_out, k_in) -> (B, k_out, k_in).

    See :func:`airtrace.ops.precondition`.
    """
    return ops.precondition(G_hat, Q_G, Q_A, Lam, damping, backend=backend)


@precondition.register_fake
def _(G_hat, Q_G, Q_A, Lam, damping, backend="auto"):
    return G_hat.new_empty(G_hat.shape, dtype=accumulation_dtype(G_hat.dtype))


@torch.library.custom_op(f"{_NAMESPACE}::group_pool_scores", mutates_args=())
def group_pool_scores(queries: torch.Tensor, train: torch.Tensor, offsets: torch.Tensor, members: torch.Tensor,
                      backend: str = "auto") -> torch.Tensor:
    """``f[x, g] = sum_{i in S_g} softmax_{S_g}(|s_i|) s_i``, ``s_i = queries[x] . train[i]``: -> (q, G).

    See :func:`airtrace.ops.group_pool_scores`.
    """
    return ops.group_pool_scores(queries, train, offsets, members, backend=backend)


@group_pool_scores.register_fake
def _(queries, train, offsets, members, backend="auto"):
    return queries.new_empty((queries.shape[0], offsets.shape[0] - 1), dtype=_promoted(queries, train))
