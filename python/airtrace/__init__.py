"""airtrace: training-data attribution engine (fused projection and streamed scoring kernels)."""

from airtrace._dispatch import BACKENDS, BackendUnavailable, available, unavailable_reason
from airtrace.ops import merge_topk, project_dense, project_factored, score_topk

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "available",
    "merge_topk",
    "project_dense",
    "project_factored",
    "score_topk",
    "unavailable_reason",
]
