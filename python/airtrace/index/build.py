"""Building an index over a store, shard by shard (``IndexSpec``, ``build_index``): train on a sample of rows, then add
every shard's index vectors, with checkpoints that a killed build resumes from; imports the other
``airtrace.index`` modules, ``airtrace.curvature``, ``airtrace.scoring``, ``airtrace.store`` and ``airtrace.util``.

Types (faiss, inner-product metric):

- ``flat``: every vector in full (float32): exact search, ``4 width`` bytes per row;
- ``ivfpq``: an inverted file of ``nlist`` lists over product-quantized vectors (``m``
  sub-quantizers of ``nbits`` bits on the rows padded to a multiple of ``m``; ``m / 8 * nbits``
  bytes + an 8-byte id per row); searched in ``nprobe`` lists;
- ``hnsw``: a graph of ``hnsw_m`` links per node over the full vectors; searched with ``ef``
  candidates. Only where it fits in memory.

Memory while building: the index, one shard (plus the one read ahead) and, for ``ivfpq``, the
training sample. A type whose estimated size exceeds ``max_memory`` (default half of the
memory available when the build starts) is refused before any work.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time

import numpy as np
import torch

from airtrace.curvature import Curvature
from airtrace.index import files
from airtrace.index.files import IndexFileError, faiss_module
from airtrace.index.vectors import Precondition, index_rows, store_preconditioner
from airtrace.scoring import check_metric, curvature_digest
from airtrace.store import Store
from airtrace.util.checks import positive_int
from airtrace.util.progress import progress_bar

log = logging.getLogger("airtrace")

TYPES = ("flat", "ivfpq", "hnsw")
TRAIN_ROWS_PER_LIST = 64
"""Training sample: this many rows per inverted list (faiss warns below 39)."""
TRAIN_ROWS_PER_CODE = 39
"""Default ``nbits``: at most 8, and at least this many training rows per code word (faiss's minimum)."""
MIN_NBITS = 4
"""Default ``nbits`` never goes below this: a store too small to train 2^4 code words of 39 rows takes "flat"."""
PQ_DIMS_PER_CODE = 4
"""Default ``m``: one sub-quantizer per 4 (padded) columns."""


@dataclasses.dataclass(frozen=True)
class IndexSpec:
    """What index to build; None fields take defaults from the store's size (:meth:`resolved`).

    Attributes:
        type: "flat", "ivfpq" or "hnsw".
        nlist: inverted lists (ivfpq); default the power of two nearest sqrt(n).
        m: PQ sub-quantizers (ivfpq); default ceil(width / 4).
        nbits: bits per sub-quantizer code (ivfpq); default 8, fewer when the sample has under 39 rows per code word.
        hnsw_m: graph links per node (hnsw); default 32.
        ef_construction: candidates while building the graph (hnsw); default 80.
        train_rows: rows sampled to train (ivfpq); default 64 per list, at least 64 x 256.
        seed: seed of the training sample and of faiss's k-means.
    """

    type: str = "ivfpq"
    nlist: int | None = None
    m: int | None = None
    nbits: int | None = None
    hnsw_m: int | None = None
    ef_construction: int | None = None
    train_rows: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.type not in TYPES:
            raise ValueError(f"index type must be one of {TYPES}, got {self.type!r}")
        for name in ("nlist", "m", "nbits", "hnsw_m", "ef_construction", "train_rows"):
            if getattr(self, name) is not None:
                positive_int(f"index {name}", getattr(self, name))
        if self.nbits is not None and not 1 <= self.nbits <= 16:
            raise ValueError(f"index nbits must be in 1..16, got {self.nbits}")

    def resolved(self, n: int, width: int) -> IndexSpec:
        """This spec with every default filled in for a store of ``n`` rows of ``width`` columns.

        Raises:
            ValueError: an ``ivfpq`` index on a store too small to train one (use "flat").
        """
        if self.type == "flat":
            return IndexSpec("flat", seed=self.seed)
        if self.type == "hnsw":
            return IndexSpec("hnsw", hnsw_m=self.hnsw_m or 32, ef_construction=self.ef_construction or 80,
                             seed=self.seed)
        nlist = self.nlist or min(2 ** max(0, round(math.log2(math.sqrt(n)))) if n else 1, 65536)
        train_rows = min(n, self.train_rows or TRAIN_ROWS_PER_LIST * max(nlist, 256))
        nbits = self.nbits or min(8, int(math.log2(max(train_rows / TRAIN_ROWS_PER_CODE, 1))))
        need = max(nlist, 2**nbits if self.nbits else 2**MIN_NBITS * TRAIN_ROWS_PER_CODE)
        if train_rows < need:
            raise ValueError(f"an ivfpq index with nlist={nlist} needs at least {need} training rows, the store has "
                             f"{n} (train_rows {train_rows}); use type 'flat' for a store this small, or a smaller "
                             "nlist / nbits")
        m = self.m or math.ceil(width / PQ_DIMS_PER_CODE)
        return IndexSpec("ivfpq", nlist=nlist, m=m, nbits=nbits, train_rows=train_rows, seed=self.seed)

    def padded_width(self, width: int) -> int:
        """Columns the faiss index sees: ``width`` rounded up to a multiple of ``m`` for ivfpq (zeros added)."""
        return math.ceil(width / self.m) * self.m if self.type == "ivfpq" else width

    def estimated_bytes(self, n: int, width: int) -> int:
        """Memory of the finished index over ``n`` rows (resolved specs only)."""
        d = self.padded_width(width)
        if self.type == "flat":
            return 4 * n * d
        if self.type == "hnsw":
            return n * (4 * d + 8 * self.hnsw_m + 16)
        return n * (math.ceil(self.m * self.nbits / 8) + 8) + 4 * d * (self.nlist + 2**self.nbits)

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where unreadable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _empty_index(spec: IndexSpec, d: int):
    faiss = faiss_module()
    if spec.type == "flat":
        return faiss.IndexFlatIP(d)
    if spec.type == "hnsw":
        index = faiss.IndexHNSWFlat(d, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.ef_construction
        return index
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFPQ(quantizer, d, spec.nlist, spec.m, spec.nbits, faiss.METRIC_INNER_PRODUCT)
    index.pq.cp.seed = spec.seed
    return index


def _train(index, spec: IndexSpec, sample: np.ndarray) -> None:
    """Train an ivfpq index: the coarse lists by k-means on every thread, then the PQ codebooks on one.

    faiss trains the m codebooks one after another, each a k-means of 2^nbits centroids on
    ``width / m`` columns: work so small per OpenMP region that on a few (shared) cores the
    threads' start and spin cost more than they save (measured on 2 loaded cores: 2.7x faster
    on one thread than on two).
    """
    faiss = faiss_module()
    clustering = faiss.Clustering(index.d, spec.nlist)
    clustering.seed = spec.seed
    clustering.train(sample, index.quantizer)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        index.train(sample)  # the quantizer holds nlist trained centroids: faiss trains the codebooks only
    finally:
        faiss.omp_set_num_threads(threads)


def _padded(Y: torch.Tensor, d: int) -> np.ndarray:
    """(rows, width) float32 -> contiguous (rows, d) numpy, zero columns added on the right."""
    if Y.shape[1] < d:
        Y = torch.nn.functional.pad(Y, (0, d - Y.shape[1]))
    return np.ascontiguousarray(Y.detach().to("cpu", torch.float32).numpy())


def _training_sample(store: Store, spec: IndexSpec, precondition: Precondition, metric: str, d: int) -> np.ndarray:
    """Index vectors of ``train_rows`` rows drawn uniformly without replacement (seeded), read row by row."""
    gen = torch.Generator().manual_seed(spec.seed)
    rows = torch.randperm(len(store), generator=gen)[: spec.train_rows].sort().values
    parts = []
    for start in range(0, rows.numel(), store.rows_per_shard):
        X, _ = store.read_rows(rows[start: start + store.rows_per_shard], dtype=torch.float32, ids=False)
        parts.append(_padded(index_rows(X, precondition, metric), d))
    return np.concatenate(parts)


def index_path(store: Store, kind: str, metric: str, partial: bool = False) -> str:
    """Where the index of ``kind`` for ``metric`` lives beside ``store``."""
    return store.sidecar_path(files.index_name(kind, metric, partial), "faiss")


def build_index(store: Store, curvature: Curvature, spec: IndexSpec | None = None, *, metric: str = "inner",
                precondition: Precondition | None = None, max_memory: int | None = None,
                checkpoint_seconds: float = 60.0, overwrite: bool = False, progress: bool = True) -> str:
    """Build (or resume, or reuse) the index of ``spec.type`` for ``metric`` over a store's preconditioned rows.

    A finished index of the same store content, curvature, metric and settings is
    reused as it is. An unfinished build of the same (its ``.partial`` files) is
    resumed from its last checkpoint, taken after training and then every
    ``checkpoint_seconds`` at a shard boundary; the finished index equals an
    uninterrupted build's (same sample, same order of additions).

    Args:
        store: a finished store.
        curvature: the fitted curvature the scores use (``identity`` for plain gradients).
        spec: the index settings (default ivfpq with defaults).
        metric: "inner", "cosine" or "relative" (the index's inner products are that metric).
        precondition: H⁻¹ on (rows, width) store rows; default from ``curvature`` and the store's layout.
        max_memory: refuse a type whose estimated size exceeds this many bytes (default half the
            available memory).
        checkpoint_seconds: seconds between checkpoints while adding shards.
        overwrite: build again even when a finished index exists.
        progress: show a progress bar.

    Returns:
        Path of the finished ``.faiss`` file (its ``.json`` record beside it).

    Raises:
        ValueError: bad settings, or an index that would not fit in ``max_memory``.
        StoreError: a curvature that does not match the store.
    """
    check_metric(metric)
    if len(store) == 0:
        raise ValueError(f"{store.path}: the store holds no rows; nothing to index")
    spec = (spec or IndexSpec()).resolved(len(store), store.width)
    precondition = precondition or store_preconditioner(store, curvature)
    if max_memory is None:
        available = available_memory()
        max_memory = available // 2 if available else None
    need = spec.estimated_bytes(len(store), store.width)
    if max_memory is not None and need > max_memory:
        raise ValueError(f"a {spec.type} index of {len(store)} rows x {store.width} needs about {need / 2**30:.2f} "
                         f"GiB, more than max_memory {max_memory / 2**30:.2f} GiB (default: half the available "
                         "memory); use type 'ivfpq' (compressed), or raise max_memory")
    final = index_path(store, spec.type, metric)
    partial = index_path(store, spec.type, metric, partial=True)
    identity = {"store": store.content_key(), "curvature": curvature_digest(curvature), "metric": metric,
                "spec": spec.to_json(), "width": store.width}
    record = files.read_record(final)
    if record is not None and not overwrite and _same(record, identity) and record["rows"] == len(store):
        files.check_file(final, record)
        return final
    files.remove(final)
    index, rows_done = _resumed(partial, identity)
    d = spec.padded_width(store.width)
    if index is None:
        index = _empty_index(spec, d)
        if spec.type == "ivfpq":
            _train(index, spec, _training_sample(store, spec, precondition, metric, d))
            files.write_index(index, partial, {**identity, "rows": 0})
    first = next((i for i, info in enumerate(store.shards) if info.row_start == rows_done), len(store.shards))
    last_checkpoint = time.monotonic()
    with progress_bar(len(store), f"index ({spec.type}, {metric})", progress, initial=rows_done) as bar:
        for chunk in store.shard_range(first, len(store.shards)).iter_shards(dtype=torch.float32):
            index.add(_padded(index_rows(chunk.features, precondition, metric), d))
            bar.update(chunk.features.shape[0])
            if time.monotonic() - last_checkpoint > checkpoint_seconds and index.ntotal < len(store):
                files.write_index(index, partial, {**identity, "rows": int(index.ntotal)})
                last_checkpoint = time.monotonic()
    files.write_index(index, final, {**identity, "rows": int(index.ntotal)})
    files.remove(partial)
    return final


def _same(record: dict, identity: dict) -> bool:
    return all(record.get(key) == value for key, value in identity.items())


def _resumed(partial: str, identity: dict):
    """(index, rows added) of a checkpoint of the same build, else (None, 0) after deleting any other."""
    try:
        record = files.read_record(partial)
        if record is not None and _same(record, identity):
            index = files.read_index(partial, record)
            if index.ntotal == record["rows"]:
                log.info("airtrace: resuming the index build %s after %d rows", partial, record["rows"])
                return index, record["rows"]
    except IndexFileError as exc:
        log.warning("airtrace: discarding the unusable checkpoint %s (%s)", partial, exc)
    files.remove(partial)
    return None, 0
