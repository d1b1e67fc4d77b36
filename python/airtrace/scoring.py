"""Streamed query x train scoring over a feature store: top-k (most helpful, most harmful), groups, the full matrix
(in memory or streamed to a file), a score sample per query, self-influence; imports ``airtrace.store``,
``airtrace.curvature``, ``airtrace.distributed``, the kernels layer and ``airtrace.util``.

The store is read one shard at a time (see :meth:`airtrace.store.Store.iter_shards`);
for every shard the per-query top-k comes from the ``score_topk`` op
and is merged into the running top-k with ``merge_topk``, so
memory is O(q * (topk + rows_per_shard)) and never O(q * n). Group scores,
the score sample and the optional full score matrix are accumulated from the
same per-shard (q, rows) blocks. The most harmful rows are the top-k of the
negated scores (for ``order="both"`` the negated queries are scored in the same pass).

Sign convention: a score > 0 means the training example lowers the query's loss
(it helps the model fit the query); < 0 means it raises it (harmful).

Metrics, for a preconditioned query ``q̃ = H⁻¹ ĝ_q`` and a train feature ``ĝ_x``
(``ĝ`` the projected gradient of an example's loss):

- ``"inner"``: ``q̃ · ĝ_x`` (influence: the first-order change of the query's loss when
  the training example is up-weighted, with its sign flipped). Its scale grows with
  the query's and the example's gradient norms: compare it within a query.
- ``"cosine"``: ``q̃ · ĝ_x / (|q̃| |ĝ_x|)`` (norms clamped at 1e-12), in [-1, 1]:
  comparable across queries and examples.
- ``"relative"``: ``q̃ · ĝ_x / sqrt(ĝ_xᵀ H⁻¹ ĝ_x)`` (relative influence; the
  self-influence is clamped at 0 and its root at 1e-12): examples with large
  gradients (outliers) no longer dominate; the query's scale remains, so rank within
  a query. Self-influence is computed per train row while streaming and cached in
  a store sidecar keyed by the store content and the curvature, so later calls skip
  the preconditioning.

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
METRIC_DEFINITIONS = {
    "inner": "influence q̃·ĝ_x, q̃ = H⁻¹ĝ_q (scale grows with both gradients: compare within a query)",
    "cosine": "q̃·ĝ_x / (|q̃| |ĝ_x|), in [-1, 1] (comparable across queries)",
    "relative": "relative influence q̃·ĝ_x / sqrt(ĝ_xᵀH⁻¹ĝ_x) (large-gradient outliers do not dominate; "
                "compare within a query)",
}
"""One line per metric (``ĝ``: an example's projected loss gradient, ``H``: the fitted curvature)."""
SIGN_CONVENTION = ("score > 0: the training example lowers the query's loss (helps); "
                   "score < 0: it raises it (harmful)")
ORDERS = ("top", "bottom", "both")
SAMPLE_SIZE = 256
"""Rows per query in :attr:`Scores.sample` (every ⌈n / 256⌉-th train row): the score distribution."""
SCORES = "scores"
METADATA_KEY = "airtrace.scores"
SELF_INFLUENCE_KEY = "airtrace.self_influence"
"""The metadata key of the self-influence cache (a checked file, see :mod:`airtrace.util.checked_file`)."""

Precondition = Callable[[torch.Tensor], torch.Tensor]
"""(rows, width) features -> (rows, width) H⁻¹-preconditioned features."""


@dataclass
class TokenScores:
    """Per-token attribution of one (query, training example) score.

    Attributes:
        scores: (T,) contribution of each (unmasked) token of the training example; with
            ``rest`` they sum to the example's score (up to the store's rounding).
        rest: the part of the score from layers without a token axis (pooled heads,
            one-token inputs).
        input_ids: the example's token ids, when its batch had ``input_ids``.
    """

    scores: list[float]
    rest: float
    input_ids: list[int] | None = None


@dataclass
class Scores:
    """Top-k training examples per query, most helpful and/or most harmful (and optional extras).

    Attributes:
        values: (q, topk) scores, sorted descending (most helpful first); -inf in empty slots
            (topk > n). None for ``order="bottom"``.
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
        bottom_values: (q, topk) scores sorted ascending (most harmful first; +inf in empty
            slots), for ``order="bottom"`` or ``"both"``, else None.
        bottom_indices: (q, topk) train row indices of ``bottom_values``.
        bottom_ids: q lists of their train ids.
        matrix: the full (q, n) scores when ``score(..., matrix=True)``, else None.
        sample: (q, s) scores of the train rows ``sample_rows`` (every ⌈n/256⌉-th row): the
            distribution of a query's scores over the training set.
        sample_rows: (s,) int64 train row indices of ``sample``.
        tokens: {(query index, train row index): TokenScores} for the listed rows, when
            ``score(..., token_batches=...)``.
    """

    values: torch.Tensor | None
    indices: torch.Tensor | None
    ids: list[list] | None
    query_ids: list
    metric: str
    groups: torch.Tensor | None = None
    stage: str = "exact"
    recall: float | None = None
    solves: list[dict] | None = None
    bottom_values: torch.Tensor | None = None
    bottom_indices: torch.Tensor | None = None
    bottom_ids: list[list] | None = None
    matrix: torch.Tensor | None = None
    sample: torch.Tensor | None = None
    sample_rows: torch.Tensor | None = None
    tokens: dict[tuple[int, int], TokenScores] | None = None

    def rankings(self) -> list[tuple[str, torch.Tensor, torch.Tensor, list[list]]]:
        """``(order, values, indices, ids)`` for "top" and/or "bottom", whichever were scored."""
        out = []
        if self.values is not None:
            out.append(("top", self.values, self.indices, self.ids))
        if self.bottom_values is not None:
            out.append(("bottom", self.bottom_values, self.bottom_indices, self.bottom_ids))
        return out

    def to_rows(self) -> list[dict]:
        """One dict per (query, order, rank), pandas-friendly (``pd.DataFrame(scores.to_rows())``).

        Keys: ``query_id``, ``order`` ("top": most helpful first, "bottom": most harmful
        first), ``rank`` (1-based), ``train_index``, ``train_id``, ``score``, ``metric``,
        and ``tokens`` / ``token_rest`` when per-token scores were computed for the row.
        Empty slots (index -1) are left out.
        """
        rows = []
        for qi, query_id in enumerate(self.query_ids):
            for order, values, indices, ids in self.rankings():
                for rank, (index, value) in enumerate(zip(indices[qi].tolist(), values[qi].tolist()), 1):
                    if index < 0:
                        continue
                    row = {"query_id": query_id, "order": order, "rank": rank, "train_index": index,
                           "train_id": ids[qi][rank - 1], "score": value, "metric": self.metric}
                    token = (self.tokens or {}).get((qi, index))
                    if token is not None:
                        row["tokens"], row["token_rest"] = token.scores, token.rest
                        if token.input_ids is not None:
                            row["input_ids"] = token.input_ids
                    rows.append(row)
        return rows


def check_metric(metric: str) -> str:
    """``metric`` if it is one of METRICS, else a ValueError listing them."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric


def check_order(order: str) -> str:
    """``order`` if it is one of ORDERS, else a ValueError listing them."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    return order


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


class ScoreSample:
    """Scores of every ⌈n / size⌉-th train row per query (a uniform sample by row index), streamed.

    Args:
        n: train rows in the store.
        q: queries.
        dtype: score dtype.
        device: where the (q, s) sample lives.
        size: most rows sampled.
    """

    def __init__(self, n: int, q: int, dtype: torch.dtype, device: str | torch.device, size: int = SAMPLE_SIZE):
        self.stride = max(1, -(-n // size))
        self.rows = torch.arange(0, n, self.stride)
        self.values = torch.zeros(q, self.rows.numel(), dtype=dtype, device=device)

    def local(self, row_offset: int, rows: int) -> torch.Tensor:
        """Positions within a shard of ``rows`` rows starting at ``row_offset`` that are sampled."""
        first = -(-row_offset // self.stride) * self.stride
        return torch.arange(first - row_offset, rows, self.stride)

    def put(self, row_offset: int, local: torch.Tensor, S: torch.Tensor) -> None:
        """Store scores S (q, len(local)) of the sampled shard positions ``local``."""
        columns = (local + row_offset) // self.stride
        self.values[:, columns.to(self.values.device)] = S.to(self.values.dtype)


class FullMatrix:
    """The (q, n) score matrix kept in memory, filled shard by shard (the in-memory twin of
    :class:`FullMatrixWriter`).

    Raises:
        ValueError: the matrix would take more than half of this machine's memory (write it to a
            file with ``full_matrix_path`` instead).
    """

    def __init__(self, q: int, n: int, dtype: torch.dtype):
        need = q * n * torch.empty(0, dtype=dtype).element_size()
        try:
            limit = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
        except (ValueError, OSError, AttributeError):
            limit = None
        if limit is not None and need > limit:
            raise ValueError(f"the full ({q}, {n}) score matrix takes {need / 2**30:.1f} GiB, more than half of this "
                             f"machine's memory; stream it to a file with full_matrix_path= (CLI --full-matrix) instead")
        self.matrix = torch.zeros(q, n, dtype=dtype)

    def write(self, row_offset: int, S: torch.Tensor) -> None:
        """Store the block S (q, rows) as columns ``row_offset ..``."""
        self.matrix[:, row_offset: row_offset + S.shape[1]] = S.detach().to("cpu", self.matrix.dtype)


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


def signed_queries(Q: torch.Tensor, order: str) -> torch.Tensor:
    """The queries whose top-k :func:`stream_scores` finds: Q ("top"), -Q ("bottom": the top-k of -S are the
    most harmful rows) or both stacked (2q, width)."""
    check_order(order)
    return Q if order == "top" else -Q if order == "bottom" else torch.cat([Q, -Q])


def split_signed(values: torch.Tensor, indices: torch.Tensor, q: int, order: str) -> tuple:
    """Top-k of :func:`signed_queries` -> (top values, top indices, bottom values, bottom indices), the bottom
    ones as scores (ascending: most harmful first) and None for an order not asked."""
    if order == "top":
        return values, indices, None, None
    if order == "bottom":
        return None, None, -values, indices
    return values[:q], indices[:q], -values[q:], indices[q:]


def stream_scores(
    Q: torch.Tensor,
    store: Store,
    *,
    topk: int,
    metric: str = "inner",
    order: str = "top",
    self_influence: SelfInfluence | None = None,
    groups: GroupScores | None = None,
    full_matrix: FullMatrixWriter | FullMatrix | Sequence[FullMatrixWriter | FullMatrix] | None = None,
    sample: ScoreSample | None = None,
    backend: str = "auto",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of every query over the store, shard by shard.

    Args:
        Q: (q, width) preconditioned query features (float32, or float64 for exact work).
        store: the train features, same layout.
        topk: results per query.
        metric: "inner", "cosine" or "relative" (needs ``self_influence``).
        order: "top" (most helpful), "bottom" (most harmful) or "both", see :func:`signed_queries`.
        self_influence: per-row self-influence provider for "relative".
        groups: accumulates group sums of the scores, if given.
        full_matrix: receives every (q, rows) block, if given (one writer, or several: a file and memory).
        sample: receives the scores of its sampled rows, if given.
        backend: ``score_topk`` backend ("auto" runs float64 queries on "torch").
        progress: show a progress bar (train examples scored, examples/s, ETA).

    Returns:
        values and indices (int64) of the top-k of ``signed_queries(Q, order)``, (q or 2q, topk),
        sorted descending; :func:`split_signed` turns them into scores.
    """
    check_metric(metric)
    if metric == "relative" and self_influence is None:
        raise ValueError("metric 'relative' needs the self-influence of the train rows")
    if not isinstance(Q, torch.Tensor) or Q.dim() != 2 or Q.shape[1] != store.width:
        shape = tuple(Q.shape) if isinstance(Q, torch.Tensor) else type(Q).__name__
        raise ValueError(f"Q must be (q, {store.width}) to match the rows of the store {store.path}, got {shape}")
    acc = accumulation_dtype(Q.dtype)
    Q = Q.to(acc)
    signed = signed_queries(Q, order)
    writers = [] if full_matrix is None else list(full_matrix) if isinstance(full_matrix, Sequence) else [full_matrix]
    cosine = metric == "cosine"
    values, indices = empty_topk(signed.shape[0], topk, acc, Q.device)
    with progress_bar(len(store), f"score ({metric})", progress) as bar:
        for chunk in timed_iter(store.iter_shards(Q.device)):
            X = chunk.features
            if metric == "relative":
                X = relative_rows(X, self_influence.rows(chunk.row_offset, X.to(acc)))
            with stage("score", rows=X.shape[0]):
                v, i = score_topk(signed, X, topk, cosine, index_offset=chunk.row_offset, backend=backend)
                values, indices = merge_topk([values, v.to(acc)], [indices, i], topk)
                if groups is not None or writers:
                    S = score_block(Q, X, cosine)
                    if groups is not None:
                        groups.add(chunk.row_offset, S)
                    for writer in writers:
                        writer.write(chunk.row_offset, S)
                    if sample is not None:
                        local = sample.local(chunk.row_offset, X.shape[0])
                        sample.put(chunk.row_offset, local, S[:, local.to(S.device)])
                elif sample is not None:
                    local = sample.local(chunk.row_offset, X.shape[0])
                    if local.numel():
                        sample.put(chunk.row_offset, local, score_block(Q, X[local.to(X.device)], cosine))
            bar.update(X.shape[0])
    if self_influence is not None:
        self_influence.save()
    return values, indices
