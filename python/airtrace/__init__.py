"""airtrace: training-data attribution engine (fused projection and streamed scoring kernels); this facade re-exports
the public API from the pipeline and kernels layers.

The public, stable surface is what ``__all__`` lists (see "Python API" in the
README); everything else may change between versions. Importing airtrace also
registers the kernels as ``torch.ops.airtrace.*`` custom ops (each op's module in
:mod:`airtrace.ops` registers its own). Only apps import this facade (``airtrace.env``
for ``__version__``); the library imports its modules directly.
"""

from airtrace.util.preflight import check_cli_memory

check_cli_memory()  # before torch loads: the command's one-line error under a too-low ulimit -v

from airtrace.attribute import (
    Attributor,
    CheckpointCapture,
    Task,
    as_batches,
    score_checkpoints,
    trainer_callback,
)
from airtrace.capture import causal_lm_losses, per_example_loss, response_labels
from airtrace.curvature import Curvature, Damping
from airtrace.ops.backends import BACKENDS, BackendUnavailable, available, unavailable_reason
from airtrace.ops.digest import digest
from airtrace.ops.group_pool_scores import group_pool_scores
from airtrace.ops.merge_topk import merge_topk
from airtrace.ops.precondition import precondition
from airtrace.ops.project_dense import project_dense
from airtrace.ops.project_sparse import project_sparse
from airtrace.ops.project_factored import project_factored
from airtrace.ops.score_topk import score_topk
from airtrace.scoring import Scores
from airtrace.store import (
    IncompleteStoreError,
    ManifestError,
    ShardError,
    SidecarError,
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
    "as_batches",
    "CheckpointCapture",
    "trainer_callback",
    "score_checkpoints",
    "Scores",
    "Curvature",
    "Damping",
    "per_example_loss",
    "causal_lm_losses",
    "response_labels",
    # feature store
    "Store",
    "StoreWriter",
    "StoreLock",
    "model_fingerprint",
    "StoreError",
    "ManifestError",
    "ShardError",
    "SidecarError",
    "StoreMismatchError",
    "IncompleteStoreError",
    "StoreLockedError",
    "StoreCompleteError",
    # kernels
    "project_factored",
    "project_dense",
    "project_sparse",
    "score_topk",
    "merge_topk",
    "precondition",
    "group_pool_scores",
    "digest",
    # backends
    "BACKENDS",
    "BackendUnavailable",
    "available",
    "unavailable_reason",
]
