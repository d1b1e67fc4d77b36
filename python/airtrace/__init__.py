"""airtrace: training-data attribution engine (fused projection and streamed scoring kernels).

The public, stable surface is what ``__all__`` lists (see "Python API" in the
README); everything else may change between versions. Importing airtrace also
registers the kernels as ``torch.ops.airtrace.*`` custom ops (:mod:`airtrace.torch_ops`).
"""

from airtrace import torch_ops as _torch_ops  # noqa: F401  (registers torch.ops.airtrace.*)
from airtrace._dispatch import BACKENDS, BackendUnavailable, available, unavailable_reason
from airtrace.attribute import Attributor, Task
from airtrace.capture import per_example_loss, response_labels
from airtrace.curvature import Curvature, Damping
from airtrace.ops import group_pool_scores, merge_topk, precondition, project_dense, project_factored, score_topk
from airtrace.scoring import Scores
from airtrace.store import (
    IncompleteStoreError,
    ManifestError,
    ShardError,
    Store,
    StoreCompleteError,
    StoreError,
    StoreLock,
    StoreLockedError,
    StoreMismatchError,
    StoreWriter,
    model_fingerprint,
)

__version__ = "0.1.0"

__all__ = [
    # attribution: featurize -> fit -> score
    "Attributor",
    "Task",
    "Scores",
    "Curvature",
    "Damping",
    "per_example_loss",
    "response_labels",
    # feature store
    "Store",
    "StoreWriter",
    "StoreLock",
    "model_fingerprint",
    "StoreError",
    "ManifestError",
    "ShardError",
    "StoreMismatchError",
    "IncompleteStoreError",
    "StoreLockedError",
    "StoreCompleteError",
    # kernels
    "project_factored",
    "project_dense",
    "score_topk",
    "merge_topk",
    "precondition",
    "group_pool_scores",
    # backends
    "BACKENDS",
    "BackendUnavailable",
    "available",
    "unavailable_reason",
]
