"""The two scoring passes of ``Attributor.score`` over preconditioned queries: the exact stream over every row of a
store, and two stages (index or embedding candidates, then their exact scores); imports ``airtrace.scoring``,
``airtrace.index``, ``airtrace.distributed``, the store, curvature and kernels layers."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from airtrace import distributed
from airtrace.curvature import Curvature
from airtrace.index import EmbeddingCandidates, Index, index_queries, two_stage
from airtrace.ops.backends import accumulation_dtype
from airtrace.scoring import (
    FullMatrix,
    FullMatrixWriter,
    GroupScores,
    Scores,
    ScoreSample,
    SelfInfluence,
    self_influence_key,
    split_signed,
    stream_scores,
)
from airtrace.store import Store


def two_stage_scores(Q: torch.Tensor, raw: torch.Tensor, query_ids: list, store: Store, curvature: Curvature,
                 metric: str, topk: int, index: Any, precondition: Callable[[torch.Tensor], torch.Tensor],
                 backend: str, progress: bool, *, nprobe: int | None, ef: int | None, candidates: int | None,
                 rerank: bool, recall: bool | None) -> Scores:
    """The top-k of :meth:`score` from two stages (:mod:`airtrace.index`): candidates, then their exact scores."""
    n, q = len(store), Q.shape[0]

    def exact() -> tuple[torch.Tensor, torch.Tensor]:
        influence = None
        if metric == "relative":
            influence = SelfInfluence(store, self_influence_key(store, curvature), precondition)
        return stream_scores(Q, store, topk=topk, metric=metric, self_influence=influence, backend=backend,
                             progress=progress)

    source = index if hasattr(index, "search") else Index.beside(store, curvature, metric, index)
    if isinstance(source, EmbeddingCandidates):
        source.check(n, q)
    found = two_stage(Q, index_queries(raw, Q, metric), store, source, topk=topk, metric=metric,
                      precondition=precondition, exact=exact, candidates=candidates,
                      rerank_candidates=rerank, recall=recall, nprobe=nprobe, ef=ef)
    train_ids = store.ids
    ids = [[train_ids[i] if i >= 0 else None for i in row] for row in found.indices.tolist()]
    return Scores(found.values.cpu(), found.indices.cpu(), ids, query_ids, metric, stage=found.stage,
                  recall=found.recall)

def exact_scores(Q: torch.Tensor, query_ids: list, store: Store, curvature: Curvature, metric: str, topk: int,
             order: str, precondition: Callable[[torch.Tensor], torch.Tensor], backend: str, progress: bool, *,
             matrix: bool, full_matrix_path: str | os.PathLike | None,
             groups: Sequence[Sequence[int]] | None) -> Scores:
    """The scores of :meth:`score` from one streamed pass over every row of ``store`` (this rank's shards)."""
    n, q = len(store), Q.shape[0]
    sums = None if groups is None else GroupScores(groups, n, q, Q.dtype, Q.device)
    sample = ScoreSample(n, q, Q.dtype, Q.device)
    influence = None
    if metric == "relative":
        influence = SelfInfluence(store, self_influence_key(store, curvature), precondition)
    in_memory = FullMatrix(q, n, accumulation_dtype(Q.dtype)) if matrix else None
    full = None
    if full_matrix_path is not None:
        meta = {"metric": metric, "store": os.path.abspath(store.path), "fingerprint": store.fingerprint,
                "query_ids": query_ids, "curvature": curvature.method}
        full = FullMatrixWriter(full_matrix_path, q, n, Q.dtype, meta)
    try:
        values, indices = stream_scores(Q, distributed.rank_shards(store), topk=topk, metric=metric, order=order,
                                        self_influence=influence, groups=sums,
                                        full_matrix=[w for w in (in_memory, full) if w is not None],
                                        sample=sample, backend=backend,
                                        progress=progress and distributed.is_main())
    except BaseException:
        if full is not None:
            full.abort()
        raise
    if full is not None:
        full.close()
    values, indices = distributed.merge_topk(values, indices, topk)
    for reduced in (sums.values if sums is not None else None, sample.values,
                    in_memory.matrix if in_memory is not None else None):
        if reduced is not None:
            distributed.all_reduce_sum(reduced)
    top_v, top_i, bottom_v, bottom_i = split_signed(values.cpu(), indices.cpu(), q, order)
    train_ids = store.ids
    names = lambda rows: [[train_ids[i] if i >= 0 else None for i in row] for row in rows.tolist()]  # noqa: E731
    return Scores(top_v, top_i, None if top_i is None else names(top_i), query_ids, metric,
                  groups=None if sums is None else sums.values.cpu(), bottom_values=bottom_v,
                  bottom_indices=bottom_i, bottom_ids=None if bottom_i is None else names(bottom_i),
                  matrix=None if in_memory is None else in_memory.matrix, sample=sample.values.cpu(),
                  sample_rows=sample.rows)
