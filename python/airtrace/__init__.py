"""airtrace: training-data attribution engine (fused projection and streamed scoring kernels)."""

from airtrace._dispatch import BACKENDS, BackendUnavailable, available, unavailable_reason
from airtrace.attribute import Attributor, Task
from airtrace.curvature import Curvature, Damping
from airtrace.ops import merge_topk, precondition, project_dense, project_factored, score_topk
from airtrace.scoring import Scores
from airtrace.store import Store, StoreError

__version__ = "0.1.0"

__all__ = [
    "Attributor",
    "BACKENDS",
    "BackendUnavailable",
    "Curvature",
    "Damping",
    "Scores",
    "Store",
    "StoreError",
    "Task",
    "available",
    "merge_topk",
    "precondition",
    "project_dense",
    "project_factored",
    "score_topk",
    "unavailable_reason",
]
