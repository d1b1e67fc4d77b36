"""Ensembles of independently trained models: each member scores the queries against its own store and the (q, n)
score matrices are averaged (TRAK-style) or summed with given weights; imports ``airtrace.attribute.attributor``,
``airtrace.scoring`` and ``airtrace.store``.

Example::

    members = []
    for seed in range(5):                                      # five models trained from other seeds
        at = Attributor(train_model(seed), "*", loss_fn=loss_fn)
        store = at.featurize(train, f"train-{seed}.store")
        at.fit(train, store=store)
        members.append((at, store))
    scores = score_ensemble(members, queries, topk=10)         # mean over the members of q̃_m · ĝ_m

Every member's store must hold the same training examples (ids); columns follow
the first member's row order and the others are matched by id. The members'
matrices are summed in float64 in memory: O(q × n) per call.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence

import torch
from safetensors.torch import load_file

from airtrace.attribute.attributor import Attributor
from airtrace.attribute.batches import Batches
from airtrace.scoring import FullMatrixWriter, Scores, check_metric
from airtrace.store import Store

F64 = torch.float64


def score_ensemble(members: Sequence[tuple[Attributor, Store | str | os.PathLike]], query_batches: Batches, *,
                   topk: int = 10, metric: str = "inner", weights: Sequence[float] | None = None,
                   full_matrix_path: str | os.PathLike | None = None, progress: bool = True) -> Scores:
    """Scores of an ensemble: ``S = Σ_m w_m S_m`` with ``S_m`` (q, n) the ``metric`` scores of member m.

    Args:
        members: (Attributor, store) per model: the Attributor on that model with its curvature fitted (or
            "identity"), the store it featurized.
        query_batches: re-iterable (ids, batch) queries, scored by every member with its own model.
        topk: results per query.
        metric: "inner", "cosine" or "relative" (of each member, before combining).
        weights: one finite number per member (e.g. learning rates for a weighted sum); None: 1 / M each (the mean).
        full_matrix_path: also write the combined (q, n) float64 matrix (tensor "scores") there.
        progress: show progress bars.

    Returns:
        :class:`Scores` of the combined matrix (values / indices (q, topk), ids in the first member's store).

    Raises:
        ValueError: no members, a weight per member missing or not finite, stores that hold other training
            examples than the first member's, or members that see other query ids.
    """
    check_metric(metric)
    members = list(members)
    if not members:
        raise ValueError("members must hold at least one (Attributor, store) pair")
    if weights is None:
        weights = [1.0 / len(members)] * len(members)
    weights = [float(w) for w in weights]
    if len(weights) != len(members) or not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be {len(members)} finite numbers (one per member), got {weights}")
    total, train_ids, column, query_ids = None, None, None, None
    with tempfile.TemporaryDirectory(prefix="airtrace-ensemble-") as tmp:
        for m, ((attributor, store), weight) in enumerate(zip(members, weights)):
            store = store if isinstance(store, Store) else Store.open(store)
            if train_ids is None:
                train_ids, column = store.ids, {i: c for c, i in enumerate(store.ids)}
            elif len(store.ids) != len(train_ids) or any(i not in column for i in store.ids):
                raise ValueError(f"member {m}: the store {store.path} holds other training examples than member 0's "
                                 f"({len(store.ids)} vs {len(train_ids)} ids); featurize every member on the same "
                                 "training set")
            path = os.path.join(tmp, f"member-{m}.safetensors")
            scores = attributor.score(query_batches, store, topk=1, metric=metric, full_matrix_path=path,
                                      progress=progress)
            if query_ids is None:
                query_ids = scores.query_ids
            elif scores.query_ids != query_ids:
                raise ValueError(f"member {m} scored other query ids than member 0; pass the same query batches")
            matrix = load_file(path)["scores"].to(F64)
            os.remove(path)
            if total is None:
                total = torch.zeros_like(matrix)
            total[:, [column[i] for i in store.ids]] += weight * matrix
    if full_matrix_path is not None:
        writer = FullMatrixWriter(full_matrix_path, *total.shape, F64,
                                  {"metric": metric, "ensemble": len(members), "weights": weights,
                                   "query_ids": query_ids})
        writer.write(0, total)
        writer.close()
    values, indices = total.topk(min(topk, total.shape[1]), dim=1)
    ids = [[train_ids[i] for i in row] for row in indices.tolist()]
    return Scores(values, indices, ids, query_ids, metric)
