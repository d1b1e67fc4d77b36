"""Candidate sources for two-stage scoring: a built faiss index (``Index``, searched with ``nprobe`` / ``ef``) and
AirRep embeddings (``EmbeddingCandidates``, the model-free stage); imports the other ``airtrace.index`` modules,
``airtrace.scoring``, ``airtrace.store`` and the kernels layer."""

from __future__ import annotations

import os

import numpy as np
import torch

from airtrace.curvature import Curvature
from airtrace.index import files
from airtrace.index.build import TYPES, index_path
from airtrace.index.files import IndexFileError, faiss_module
from airtrace.ops.score_topk import score_topk
from airtrace.scoring import check_metric, curvature_digest
from airtrace.store import Store
from airtrace.util.checks import positive_int


class Index:
    """A finished index of a store, checked against the store content, curvature and metric it is used with.

    Args:
        path: the ``.faiss`` file (its ``.json`` record beside it).
        store: the store it must have been built from.
        curvature: the curvature the scores use.
        metric: the score metric.

    Attributes:
        path, record: the file and its record (type, settings, rows, sha256).
        stage: "index:<type>" (the name of this candidate stage in results).

    Raises:
        IndexFileError: no finished index at ``path``, a damaged file, or one built from another store
            content, curvature or metric (the message says which and how to rebuild).
    """

    def __init__(self, path: str | os.PathLike, store: Store, curvature: Curvature, metric: str):
        self.path = os.fspath(path)
        record = files.read_record(self.path)
        fix = f"build it with `airtrace index build {store.path} --metric {metric} ...` (or build_index)"
        if record is None:
            raise IndexFileError(f"{self.path}: no finished index there; {fix}")
        wanted = {"store": store.content_key(), "curvature": curvature_digest(curvature), "metric": metric}
        what = {"store": "store content", "curvature": "curvature", "metric": "metric"}
        for key, value in wanted.items():
            if record[key] != value:
                raise IndexFileError(f"{self.path}: the index was built for another {what[key]} ({key} "
                                     f"{record[key]!r}, this run has {value!r}); {fix}")
        if record["rows"] != len(store):
            raise IndexFileError(f"{self.path}: holds {record['rows']} rows, the store {len(store)}; {fix}")
        self.record = record
        self.index = files.read_index(self.path, record)

    @classmethod
    def beside(cls, store: Store, curvature: Curvature, metric: str, kind: str | os.PathLike) -> Index:
        """The index of type ``kind`` ("flat", "ivfpq", "hnsw") for ``metric`` beside ``store``, or a path to one."""
        check_metric(metric)
        path = index_path(store, kind, metric) if kind in TYPES else os.fspath(kind)
        return cls(path, store, curvature, metric)

    @property
    def type(self) -> str:
        return self.record["spec"]["type"]

    @property
    def stage(self) -> str:
        return f"index:{self.type}"

    def search(self, Z: torch.Tensor, count: int, *, nprobe: int | None = None, ef: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``count`` rows of largest inner product with each query vector.

        Args:
            Z: (q, width) query vectors (:func:`airtrace.index.vectors.index_queries`).
            count: results per query.
            nprobe: inverted lists searched (ivfpq; default 32, at most nlist).
            ef: graph candidates kept (hnsw; default max(64, count)).

        Returns:
            values (q, count) float32 (approximate scores; -inf in empty slots) and indices
            (q, count) int64 (-1 in empty slots), on the CPU.
        """
        count = positive_int("count", count)
        if nprobe is not None:
            positive_int("nprobe", nprobe)
        if ef is not None:
            positive_int("ef", ef)
        faiss = faiss_module()
        if self.type == "ivfpq":
            faiss.extract_index_ivf(self.index).nprobe = min(nprobe or 32, self.record["spec"]["nlist"])
        elif self.type == "hnsw":
            self.index.hnsw.efSearch = max(ef or 64, count)
        d = self.index.d
        Z = Z.detach().to("cpu", torch.float32)
        if Z.dim() != 2 or Z.shape[1] != self.record["width"]:
            raise ValueError(f"Z must be (q, {self.record['width']}), got {tuple(Z.shape)}")
        Z = torch.nn.functional.pad(Z, (0, d - Z.shape[1])) if Z.shape[1] < d else Z
        values, indices = self.index.search(np.ascontiguousarray(Z.numpy()), count)
        values, indices = torch.from_numpy(values), torch.from_numpy(indices).to(torch.int64)
        return values.masked_fill(indices < 0, float("-inf")), indices


class EmbeddingCandidates:
    """Candidates by embedding dot products (e.g. AirRep's ``e(x)·e(z)``), computed without the model's gradients.

    Args:
        train: (n, d) embeddings of the store's rows, in row order.
        queries: (q, d) embeddings of the queries, in the order they are scored.

    Attributes:
        stage: "embeddings".
    """

    stage = "embeddings"

    def __init__(self, train: torch.Tensor, queries: torch.Tensor):
        for name, t in (("train", train), ("queries", queries)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise ValueError(f"{name} embeddings must be a 2-D tensor, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if train.shape[1] != queries.shape[1]:
            raise ValueError(f"train embeddings are {train.shape[1]} wide, query embeddings {queries.shape[1]}")
        self.train, self.queries = train.float(), queries.float()

    def check(self, n: int, q: int) -> None:
        """Raise unless there is one train embedding per store row and one query embedding per query."""
        if self.train.shape[0] != n or self.queries.shape[0] != q:
            raise ValueError(f"the embeddings cover {self.train.shape[0]} train rows and {self.queries.shape[0]} "
                             f"queries; the store has {n} rows and there are {q} queries")

    def search(self, Z: torch.Tensor, count: int, **_) -> tuple[torch.Tensor, torch.Tensor]:
        """Top ``count`` train rows per query by embedding dot product (``Z`` only gives the query count)."""
        self.check(self.train.shape[0], Z.shape[0])
        return score_topk(self.queries, self.train, min(positive_int("count", count), self.train.shape[0]))
