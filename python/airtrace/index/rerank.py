"""Two-stage retrieval (``two_stage``): candidates from an index or embeddings, then the exact scores of only those
rows, read from the store, and the measured recall against the exact streamed top-k; imports the other
``airtrace.index`` modules, ``airtrace.scoring``, ``airtrace.store`` and the kernels layer."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from airtrace.index.vectors import Precondition
from airtrace.ops.backends import accumulation_dtype
from airtrace.ops.merge_topk import empty_topk, merge_topk
from airtrace.scoring import check_metric, relative_rows, score_block
from airtrace.store import Store
from airtrace.util.checks import positive_int

EXACT_AFFORDABLE = 2**28
"""recall=None measures recall when the store holds at most this many feature values (rows x width)."""
RERANK_ROWS = 4096
"""Candidate rows read and scored at a time."""


@dataclasses.dataclass
class Retrieval:
    """The top-k of a two-stage search.

    Attributes:
        values: (q, topk) scores, sorted descending (-inf in empty slots).
        indices: (q, topk) int64 store rows (-1 in empty slots).
        stage: what produced them: "<source>" (the candidates' own scores) or "<source>+exact"
            (the candidates re-scored exactly), source "index:<type>" or "embeddings".
        recall: recall@topk against the exact streamed top-k, when measured, else None.
        seconds: {"candidates", "rerank", "exact"} wall times of the stages that ran.
    """

    values: torch.Tensor
    indices: torch.Tensor
    stage: str
    recall: float | None
    seconds: dict


def recall_at(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean over queries of |found ∩ exact| / |exact|, over the valid (>= 0) indices of the exact (q, k) top-k."""
    hits, total = 0, 0
    for f, e in zip(found.tolist(), exact.tolist()):
        want = {i for i in e if i >= 0}
        hits += len(want.intersection(f))
        total += len(want)
    return hits / total if total else 1.0


def rerank(Q: torch.Tensor, store: Store, candidates: torch.Tensor, topk: int, metric: str,
           precondition: Precondition) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact scores of each query's candidate rows, read from the store (only those rows), and their top-k.

    Scores are those of :func:`airtrace.scoring.stream_scores` (same metric, same row scaling).

    Args:
        Q: (q, width) preconditioned queries ``q̃``.
        store: the train store.
        candidates: (q, c) int64 store rows per query (-1 = none).
        topk: results per query.
        metric: "inner", "cosine" or "relative".
        precondition: H⁻¹ on store rows (for the self-influence of "relative").

    Returns:
        values (q, topk) and indices (q, topk), sorted as ``score_topk`` sorts.
    """
    acc = accumulation_dtype(Q.dtype)
    Q = Q.to(acc)
    q, c = candidates.shape
    valid = candidates >= 0
    rows, inverse = torch.unique(candidates[valid], return_inverse=True)
    where = torch.full((q, c), -1, dtype=torch.int64)
    where[valid] = inverse
    scores = torch.full((q, c), float("-inf"), dtype=acc)
    for start in range(0, rows.numel(), RERANK_ROWS):
        X, _ = store.read_rows(rows[start: start + RERANK_ROWS], dtype=acc, ids=False)
        X = X.to(Q.device)
        if metric == "relative":
            X = relative_rows(X, (X * precondition(X).to(acc)).sum(dim=1))
        S = score_block(Q, X, metric == "cosine").cpu()
        qi, ci = ((where >= start) & (where < start + X.shape[0])).nonzero(as_tuple=True)
        scores[qi, ci] = S[qi, where[qi, ci] - start]
    indices = candidates.masked_fill(~valid, -1)
    return merge_topk([scores], [indices], topk)


def two_stage(Q: torch.Tensor, Z: torch.Tensor, store: Store, source, *, topk: int, metric: str,
              precondition: Precondition, exact: Callable[[], tuple[torch.Tensor, torch.Tensor]],
              candidates: int | None = None, rerank_candidates: bool = True, recall: bool | None = None,
              nprobe: int | None = None, ef: int | None = None) -> Retrieval:
    """Top-k from a candidate source, re-scored exactly, with the measured recall.

    Args:
        Q: (q, width) preconditioned queries ``q̃`` (for the exact re-scoring).
        Z: (q, width) the queries as the index takes them (:func:`airtrace.index.vectors.index_queries`).
        store: the train store the source covers.
        source: :class:`airtrace.index.Index` or :class:`airtrace.index.EmbeddingCandidates`.
        topk: results per query.
        metric: the score metric.
        precondition: H⁻¹ on store rows (for "relative").
        exact: the exact streamed top-k ``() -> (values, indices)``, run when recall is measured.
        candidates: candidates per query re-scored (default max(100, 10 topk)).
        rerank_candidates: re-score the candidates exactly (False: the source's own scores, top-k).
        recall: measure recall@topk with an exact pass (None: when the store holds at most
            ``EXACT_AFFORDABLE`` values).
        nprobe, ef: the index's search knobs.

    Returns:
        :class:`Retrieval`.
    """
    check_metric(metric)
    topk = positive_int("topk", topk)
    count = positive_int("candidates", candidates) if candidates is not None else max(100, 10 * topk)
    count = max(count, topk) if rerank_candidates else topk
    seconds = {}
    start = time.perf_counter()
    values, indices = source.search(Z, min(count, len(store)), nprobe=nprobe, ef=ef)
    seconds["candidates"] = time.perf_counter() - start
    stage = source.stage
    if rerank_candidates:
        start = time.perf_counter()
        values, indices = rerank(Q, store, indices, topk, metric, precondition)
        seconds["rerank"] = time.perf_counter() - start
        stage += "+exact"
    else:
        pad_v, pad_i = empty_topk(values.shape[0], max(0, topk - values.shape[1]), values.dtype, values.device)
        values, indices = torch.cat([values, pad_v], 1)[:, :topk], torch.cat([indices, pad_i], 1)[:, :topk]
    measured = None
    if recall or (recall is None and len(store) * store.width <= EXACT_AFFORDABLE):
        start = time.perf_counter()
        measured = recall_at(indices, exact()[1])
        seconds["exact"] = time.perf_counter() - start
    return Retrieval(values, indices, stage, measured, seconds)
