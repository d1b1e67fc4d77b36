"""LDS of AirRep group scores: per held-out query, Spearman between predicted and retrained subset outputs; imports
``airtrace.airrep.pooling`` and ``airtrace.eval.metrics``.

Unlike additive attributions (:func:`airtrace.eval.metrics.lds`, which sums
per-example scores over a subset), attention pooling is not a sum, so the
predicted value of subset k for query x is the pooled group score
``f(x, S_k)`` itself.
"""

from __future__ import annotations

import torch

from airtrace.airrep.pooling import group_scores, masks_to_csr
from airtrace.eval.metrics import LDSResult, bootstrap_ci, spearman_columns


def lds_of_predictions(predicted: torch.Tensor, outputs: torch.Tensor, *, bootstrap: int = 1000,
                       seed: int = 0) -> LDSResult:
    """LDS from predicted subset values.

    Args:
        predicted: (m, q) predicted value of subset k for query x (higher = helps more).
        outputs: (m, q) retrained outputs (higher = the query is fit better).
        bootstrap: resamples of the queries for the 95% interval.
        seed: bootstrap seed.

    Returns:
        :class:`airtrace.eval.metrics.LDSResult` (per-query Spearman, NaN -> 0).
    """
    if predicted.shape != outputs.shape or predicted.dim() != 2:
        raise ValueError(f"predicted and outputs must both be (m, q), got {tuple(predicted.shape)} "
                         f"and {tuple(outputs.shape)}")
    per_query = spearman_columns(predicted, outputs)
    return LDSResult(float(per_query.mean()), per_query, bootstrap_ci(per_query, bootstrap, seed))


def airrep_lds(queries: torch.Tensor, train: torch.Tensor, masks: torch.Tensor, outputs: torch.Tensor, *,
               pooling: str = "attention", bootstrap: int = 1000, seed: int = 0,
               backend: str = "auto") -> LDSResult:
    """LDS of pooled AirRep group scores.

    Args:
        queries: (q, d) query embeddings.
        train: (n, d) training embeddings.
        masks: (m, n) bool subsets.
        outputs: (m, q) retrained outputs of the queries.
        pooling: "attention", "attention-signed" or "sum".
        bootstrap, seed: confidence interval settings.
        backend: kernel backend of the attention pooling.
    """
    offsets, members = masks_to_csr(masks)
    predicted = group_scores(queries, train, offsets, members, pooling=pooling, backend=backend)
    return lds_of_predictions(predicted.T.to(torch.float64), outputs, bootstrap=bootstrap, seed=seed)
