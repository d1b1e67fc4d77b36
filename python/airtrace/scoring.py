"""Streamed query x train scoring over a feature store: top-k, groups, full matrix, self-influence; imports
``airtrace.store``, ``airtrace.curvature``, ``airtrace.distributed``, the kernels layer and ``airtrace.util``.

The store is read one shard at a time (see :meth:`airtrace.store.Store.iter_shards`);
for every shard the per-query top-k comes from the ``score_topk`` op
and is merged into the running top-k with ``merge_topk``, so
memory is O(q * (topk + rows_per_shard)) and never O(q * n). Group scores and
the optional full score matrix are accumulated from the same per-shard
(q, rows) blocks.

Metrics, for a preconditioned query ``q̃ = H⁻¹ ĝ_q`` and a train feature ``ĝ_x``:

- ``"inner"``: ``q̃ · ĝ_x`` (influence).
- ``"cosine"``: ``q̃ · ĝ_x / (|q̃| |ĝ_x|)`` (norms clamped at 1e-12).
- ``"relative"``: ``q̃ · ĝ_x / sqrt(ĝ_xᵀ H⁻¹ ĝ_x)`` (relative influence; the
  self-influence is clamped at 0 and its root at 1e-12). Self-influence is
  computed per train row while streaming and cached in a store sidecar keyed by
  the store content and the curvature, so later calls skip the preconditioning.

Precision: scores accumulate in float32 (float64 for float64 queries, on the
"torch" backend), whatever the store dtype.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from airtrace import distributed
from airtrace.curvature import Curvature
from airtrace.ops.backends import accumulation_dtype
from airtrace.ops.merge_topk import NORM_EPS, empty_topk, merge_topk
from airtrace.ops.score_topk import normalized, score_topk
from airtrace.profiling import stage, timed_iter
from airtrace.store import Store
from airtrace.store.sidecars import SELF_INFLUENCE, self_influence_sidecar
from airtrace.util.checked_file import load_checked, save_checked
from airtrace.util.checks import check_groups
from airtrace.util.progress import progress_bar

log = logging.getLogger("airtrace")

METRICS = ("inner", "cosine", "relative")
SCORES = "scores"
METADATA_KEY = "airtrace.scores"
SELF_INFLUENCE_KEY = "airtrace.self_influence"
"""The metadata key of the self-influence cache (a checked file, see :mod:`airtrace.util.checked_file`)."""

Precondition = Callable[[torch.Tensor], torch.Tensor]
"""(rows, width) features -> (rows, width) H⁻¹-preconditioned features."""


@dataclass
class Scores:
    """Top-k training examples per query (and optional group scores).

    Attributes:
        values: (q, topk) scores, sorted descending; -inf in empty slots (topk > n).
        indices: (q, topk) int64 global train row indices; -1 in empty slots.
        ids: q lists of topk train example ids (None in empty slots).
        query_ids: the q query ids, in order.
        metric: "inner", "cosine" or "relative".
        groups: (q, G) sum of the metric's scores over each group, or None.
        stage: what produced the top-k: "exact" (the streamed pass over every row), or a two-stage
            search (:mod:`airtrace.index`): "index:<type>" / "embeddings" with "+exact" when the
            candidates were re-scored exactly.
        recall: recall@topk of a two-stage search against the exact pass, when measured, else None.
        solves: curvature "exact": one convergence report per solve (method, iterations, residual, ...), else None.
    """

    values: torch.Tensor
    indices: torch.Tensor
    ids: list[list]
    query_ids: list
    metric: str
    groups: torch.Tensor | None = None
    stage: str = "exact"
    recall: float | None = None
    solves: list[dict] | None = None

    def to_rows(self) -> list[dict]:
        """One dict per (query, rank): ``query_id, rank`` (1-based), ``train_index, train_id, score``.

        Empty slots (index -1) are left out.
        """
        rows = []
        for qi, query_id in enumerate(self.query_ids):
            for rank, (index, value) in enumerate(zip(self.indices[qi].tolist(), self.values[qi].tolist()), 1):
                if index >= 0:
                    rows.append({"query_id": query_id, "rank": rank, "train_index": index,
                                 "train_id": self.ids[qi][rank - 1], "score": value})
        return rows


def check_metric(metric: str) -> str:
    """``metric`` if it is one of METRICS, else a ValueError listing them."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric


# --------------------------------------------------------------------------- self-influence


def self_influence_rows(X: torch.Tensor, precondition: Precondition) -> torch.Tensor:
    """``ĝ_xᵀ H⁻¹ ĝ_x`` per row: X (rows, width) -> (rows,) in the accumulation dtype of X."""
    X = X.to(accumulation_dtype(X.dtype))
    return (X * precondition(X).to(X.dtype)).sum(dim=1)


def curvature_digest(curvature: Curvature) -> str:
    """sha256 hex of a curvature's metadata and every tensor's bytes (float64, CPU)."""
    digest = hashlib.sha256(json.dumps(curvature.metadata, sort_keys=True).encode())
    for name, inverse in curvature.inverses.items():
        for key, t in sorted(inverse.tensors().items()):
            digest.update(f"{name}/{key}".encode())
            digest.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def self_influence_key(store: Store, curvature: Curvature) -> str:
    """Cache key of the self-influence of ``store`` under ``curvature`` (24 hex digits)."""
    digest = hashlib.sha256(store.content_key().encode())
    digest.update(curvature_digest(curvature).encode())
    return digest.hexdigest()[:24]


class SelfInfluence:
    """Self-influence of every train row, read from the store sidecar or computed shard by shard.

    Args:
        store: the train feature store.
        key: :func:`self_influence_key` of the store and curvature.
        precondition: applies H⁻¹ to (rows, width) features.
    """

    def __init__(self, store: Store, key: str, precondition: Precondition):
        self.store, self.precondition = store, precondition
        self.path = self_influence_sidecar(store, key)
        self.cached = self._load()
        self._computed: list[torch.Tensor] = []

    def _load(self) -> torch.Tensor | None:
        if not os.path.exists(self.path):
            return None
        try:
            tensors, _ = load_checked(self.path, SELF_INFLUENCE_KEY, "an airtrace self-influence cache")
            values = tensors[SELF_INFLUENCE]
        except (ValueError, KeyError) as exc:
            log.warning("airtrace: ignoring the self-influence cache, it is recomputed: %s", exc)
            return None
        if tuple(values.shape) != (len(self.store),):
            log.warning("airtrace: ignoring self-influence cache %s of shape %s", self.path, tuple(values.shape))
            return None
        return values

    def rows(self, row_offset: int, X: torch.Tensor) -> torch.Tensor:
        """Self-influence (rows,) of the shard X (rows, width) starting at global row ``row_offset``."""
        if self.cached is not None:
            return self.cached[row_offset: row_offset + X.shape[0]].to(X.device, accumulation_dtype(X.dtype))
        values = self_influence_rows(X, self.precondition)
        self._computed.append(values.detach().to("cpu", torch.float64))
        return values

    def save(self) -> None:
        """Write the computed values (all n rows) to the sidecar, atomically; a failure only warns.

        In a distributed run every rank calls it: the ranks' rows (contiguous
        blocks of shards, see :func:`airtrace.distributed.rank_shards`) are
        gathered in rank order and rank 0 writes the file.
        """
        if self.cached is not None:
            return
        parts = [v for part in distributed.gather_objects(self._computed) for v in part]
        if sum(v.shape[0] for v in parts) != len(self.store):
            return
        values = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)  # an empty store: no rows
        if distributed.is_main():
            try:
                save_checked({SELF_INFLUENCE: values}, self.path, SELF_INFLUENCE_KEY, {"rows": len(self.store)})
            except OSError as exc:
                log.warning("airtrace: could not cache self-influence (%s)", exc)
        self.cached = values


def store_self_influence(store: Store, key: str, precondition: Precondition, *, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, progress: bool = True) -> torch.Tensor:
    """``ĝ_xᵀ H⁻¹ ĝ_x`` of every train row (n,) float64 on the CPU, streamed and cached in a sidecar.

    Args:
        store: the train feature store.
        key: :func:`self_influence_key` of the store and curvature.
        precondition: applies H⁻¹ to (rows, width) features.
        device: where shards are preconditioned.
        dtype: computation dtype (float32 or float64).
        progress: show a progress bar.
    """
    cache = SelfInfluence(store, key, precondition)
    if cache.cached is None:
        part = distributed.rank_shards(store)
        with progress_bar(len(part), "self-influence", progress and distributed.is_main()) as bar:
            for chunk in timed_iter(part.iter_shards(device, dtype=dtype)):
                cache.rows(chunk.row_offset, chunk.features)
                bar.update(chunk.features.shape[0])
        cache.save()
    return cache.cached.to(torch.float64)


# --------------------------------------------------------------------------- groups and full matrix


class GroupScores:
    """Streamed sums of scores over groups of train rows.

    Args:
        groups: G sequences of global train row indices (a row may be in several groups).
        n: train rows in the store.
        q: queries.
        dtype: score dtype.
        device: where the (q, G) sums live.
    """

    def __init__(self, groups: Sequence[Sequence[int]], n: int, q: int, dtype: torch.dtype,
                 device: str | torch.device):
        rows, owners = _group_members(groups, n)
        order = torch.argsort(rows, stable=True)
        self.rows, self.owners = rows[order].to(device), owners[order].to(device)
        self.values = torch.zeros(q, len(groups), dtype=dtype, device=device)

    def add(self, row_offset: int, S: torch.Tensor) -> None:
        """Add a shard's scores S (q, rows) for global rows ``row_offset ..``."""
        bounds = torch.tensor([row_offset, row_offset + S.shape[1]], device=self.rows.device)
        lo, hi = torch.searchsorted(self.rows, bounds).tolist()
        if hi > lo:
            self.values.index_add_(1, self.owners[lo:hi], S[:, self.rows[lo:hi] - row_offset].to(self.values.dtype))


def _group_members(groups: Sequence[Sequence[int]], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened (row, group) pairs of ``groups``, checked to lie in [0, n)."""
    rows, owners = [], []
    for g, members in enumerate(check_groups(groups)):
        members = torch.tensor(members, dtype=torch.int64)
        if members.numel() and (int(members.min()) < 0 or int(members.max()) >= n):
            raise ValueError(f"groups[{g}] holds row indices outside [0, {n}) (the store has {n} rows)")
        rows.append(members)
        owners.append(torch.full_like(members, g))
    return torch.cat(rows), torch.cat(owners)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _remove_partials_of_dead_runs(path: str) -> None:
    """Delete ``<path>.<host>.<pid>.tmp`` files that killed runs on this host left behind."""
    prefix = f"{path}.{socket.gethostname()}."
    for tmp in glob.glob(glob.escape(prefix) + "*.tmp"):
        pid = tmp[len(prefix): -len(".tmp")]
        if pid.isdigit() and not _running(int(pid)):
            log.info("airtrace: removing %s, the partial score matrix of a run that no longer exists", tmp)
            os.unlink(tmp)


class FullMatrixWriter:
    """Writes the (q, n) score matrix to one safetensors file (tensor "scores"), shard by shard.

    The header is written first and the data section is filled column block by
    column block through a memory map, so only one shard's (q, rows) block is
    in memory; the file appears under ``path`` (atomic rename) only when
    complete. The safetensors metadata ``airtrace.scores`` records the metric,
    query ids and store.

    Args:
        path: output file.
        q: queries (rows of the matrix).
        n: train examples (columns).
        dtype: torch.float32 or torch.float64.
        metadata: JSON-serialisable description.
    """

    def __init__(self, path: str | os.PathLike, q: int, n: int, dtype: torch.dtype, metadata: dict):
        self.path = os.fspath(path)
        _remove_partials_of_dead_runs(self.path)
        self.tmp = f"{self.path}.{socket.gethostname()}.{os.getpid()}.tmp"
        header, itemsize = _header(q, n, dtype, metadata)
        with open(self.tmp, "wb") as f:
            f.write(header)
            f.truncate(len(header) + q * n * itemsize)
        self.dtype = dtype
        self.matrix = np.memmap(self.tmp, dtype=torch.empty(0, dtype=dtype).numpy().dtype, mode="r+",
                                offset=len(header), shape=(q, n))

    def write(self, row_offset: int, S: torch.Tensor) -> None:
        """Store the block S (q, rows) as columns ``row_offset ..``."""
        self.matrix[:, row_offset: row_offset + S.shape[1]] = S.detach().to("cpu", self.dtype).numpy()

    def close(self) -> None:
        """Flush and move the finished file into place."""
        self.matrix.flush()
        del self.matrix
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Drop the unfinished file."""
        self.matrix = None
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def _header(q: int, n: int, dtype: torch.dtype, metadata: dict) -> tuple[bytes, int]:
    """safetensors length prefix + header of one (q, n) tensor "scores" (F32 or F64), and its item size."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the full score matrix is float32 or float64, got {dtype}")
    code, itemsize = ("F64", 8) if dtype == torch.float64 else ("F32", 4)
    raw = {"__metadata__": {METADATA_KEY: json.dumps(metadata)},
           SCORES: {"dtype": code, "shape": [q, n], "data_offsets": [0, q * n * itemsize]}}
    text = json.dumps(raw, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, itemsize


# --------------------------------------------------------------------------- streamed scoring


def relative_rows(X: torch.Tensor, si: torch.Tensor) -> torch.Tensor:
    """X (rows, width) divided row-wise by sqrt(max(si, 0)) clamped at 1e-12."""
    return X.to(si.dtype) / si.clamp_min(0).sqrt().clamp_min(NORM_EPS)[:, None]


def score_block(Q: torch.Tensor, X: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Dense (q, rows) scores of one shard, as ``score_topk`` defines them."""
    X = X.to(Q.dtype)
    return normalized(Q) @ normalized(X).T if normalize else Q @ X.T


def stream_scores(
    Q: torch.Tensor,
    store: Store,
    *,
    topk: int,
    metric: str = "inner",
    self_influence: SelfInfluence | None = None,
    groups: GroupScores | None = None,
    full_matrix: FullMatrixWriter | None = None,
    backend: str = "auto",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of every query over the store, shard by shard.

    Args:
        Q: (q, width) preconditioned query features (float32, or float64 for exact work).
        store: the train features, same layout.
        topk: results per query.
        metric: "inner", "cosine" or "relative" (needs ``self_influence``).
        self_influence: per-row self-influence provider for "relative".
        groups: accumulates group sums of the scores, if given.
        full_matrix: receives every (q, rows) block, if given.
        backend: ``score_topk`` backend ("auto" runs float64 queries on "torch").
        progress: show a progress bar (train examples scored, examples/s, ETA).

    Returns:
        values (q, topk) and indices (q, topk) int64, sorted descending.
    """
    check_metric(metric)
    if metric == "relative" and self_influence is None:
        raise ValueError("metric 'relative' needs the self-influence of the train rows")
    if not isinstance(Q, torch.Tensor) or Q.dim() != 2 or Q.shape[1] != store.width:
        shape = tuple(Q.shape) if isinstance(Q, torch.Tensor) else type(Q).__name__
        raise ValueError(f"Q must be (q, {store.width}) to match the rows of the store {store.path}, got {shape}")
    acc = accumulation_dtype(Q.dtype)
    Q = Q.to(acc)
    values, indices = empty_topk(Q.shape[0], topk, acc, Q.device)
    with progress_bar(len(store), f"score ({metric})", progress) as bar:
        for chunk in timed_iter(store.iter_shards(Q.device)):
            X = chunk.features
            if metric == "relative":
                X = relative_rows(X, self_influence.rows(chunk.row_offset, X.to(acc)))
            with stage("score"):
                v, i = score_topk(Q, X, topk, metric == "cosine", index_offset=chunk.row_offset, backend=backend)
                values, indices = merge_topk([values, v.to(acc)], [indices, i], topk)
                if groups is not None or full_matrix is not None:
                    S = score_block(Q, X, metric == "cosine")
                    if groups is not None:
                        groups.add(chunk.row_offset, S)
                    if full_matrix is not None:
                        full_matrix.write(chunk.row_offset, S)
            bar.update(X.shape[0])
    if self_influence is not None:
        self_influence.save()
    return values, indices
