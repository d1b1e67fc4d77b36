"""ANN index over a store and two-stage retrieval: index vectors whose inner products are the score metric
(``vectors``), the index files beside the store (``files``), building them shard by shard and resumably (``build``),
candidate sources (``search``: a faiss index or embeddings) and exact re-scoring of candidates with the measured
recall (``rerank``); a pipeline package that imports ``airtrace.scoring``, ``airtrace.store``,
``airtrace.curvature``, the kernels layer and ``airtrace.util`` (and faiss, on use).

Streamed exact scoring reads every row for every query batch. For very large stores an
index narrows each query to a few candidates (``Index.search``), whose exact scores are
then computed from only those rows of the store (``two_stage``): the same metric as the
exact pass, at a fraction of the reads; the result says which stage produced it and, when
an exact pass is affordable or asked for, the recall@k it reached.
"""

from airtrace.index.build import TYPES, IndexSpec, build_index, index_path
from airtrace.index.files import IndexFileError
from airtrace.index.rerank import Retrieval, recall_at, rerank, two_stage
from airtrace.index.search import EmbeddingCandidates, Index
from airtrace.index.vectors import index_queries, index_rows, store_preconditioner

__all__ = [
    "EmbeddingCandidates",
    "Index",
    "IndexFileError",
    "IndexSpec",
    "Retrieval",
    "TYPES",
    "build_index",
    "index_path",
    "index_queries",
    "index_rows",
    "recall_at",
    "rerank",
    "store_preconditioner",
    "two_stage",
]
