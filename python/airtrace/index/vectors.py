"""What an index holds: store rows preconditioned and scaled so that a plain inner product with a query vector is the
score metric; imports ``airtrace.curvature``, ``airtrace.store`` and the kernels layer.

For a train feature ``ĝ_x`` and the preconditioned query ``q̃ = H⁻¹ ĝ_q`` the metrics of
:mod:`airtrace.scoring` are ``ĝ_qᵀ H⁻¹ ĝ_x`` times a row factor and a query factor
(``H⁻¹`` is symmetric), so the index stores ``y_x = c_x H⁻¹ ĝ_x`` and is searched with
``z_q = a_q ĝ_q``:

- ``inner``:    ``c_x = 1``,                          ``a_q = 1``;
- ``cosine``:   ``c_x = 1 / |ĝ_x|``,                  ``a_q = 1 / |q̃|``;
- ``relative``: ``c_x = 1 / sqrt(ĝ_xᵀ H⁻¹ ĝ_x)``,      ``a_q = 1``.

Norms and square roots are clamped as the streamed scoring clamps them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from airtrace.curvature import Curvature
from airtrace.ops.merge_topk import NORM_EPS
from airtrace.scoring import check_metric, relative_rows
from airtrace.store import Store, StoreError

Precondition = Callable[[torch.Tensor], torch.Tensor]
"""(rows, width) features -> (rows, width) H⁻¹-preconditioned features."""


def store_preconditioner(store: Store, curvature: Curvature) -> Precondition:
    """H⁻¹ of ``curvature`` on rows of ``store``, float32 through the fused kernels (as self-influence is computed).

    Raises:
        StoreError: the curvature's layers or dims are not the store's layout.
    """
    dims = {block.name: tuple(block.shape) for block in store.layout}
    if curvature.dims != dims:
        raise StoreError(f"{store.path}: the curvature covers {curvature.dims}, the store's layout is {dims}; "
                         "fit the curvature on this store")

    def apply(X: torch.Tensor) -> torch.Tensor:
        pre = curvature.precondition(store.split(X), exact=False)
        return torch.cat([pre[block.name].reshape(X.shape[0], -1) for block in store.layout], dim=1)

    return apply


def index_rows(X: torch.Tensor, precondition: Precondition, metric: str) -> torch.Tensor:
    """``y_x = c_x H⁻¹ ĝ_x``: (rows, width) store features -> (rows, width) float32 index vectors."""
    check_metric(metric)
    X = X.float()
    P = precondition(X).float()
    if metric == "cosine":
        return P / X.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    if metric == "relative":
        return relative_rows(P, (X * P).sum(dim=1))  # by the self-influence ĝ_xᵀ H⁻¹ ĝ_x
    return P


def index_queries(raw: torch.Tensor, preconditioned: torch.Tensor, metric: str) -> torch.Tensor:
    """``z_q = a_q ĝ_q``: raw (q, width) query features and their preconditioned ``q̃`` -> (q, width) float32."""
    check_metric(metric)
    raw = raw.float()
    if metric == "cosine":
        return raw / preconditioned.float().norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    return raw
