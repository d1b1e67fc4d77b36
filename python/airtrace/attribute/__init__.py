"""High-level attribution API: featurize -> fit -> score (``Attributor``), and the CLI's ``Task``; re-exports the names
of its modules, which import the rest of the pipeline, ``airtrace.distributed``, the kernels layer and
``airtrace.util``.

Example::

    def loss_fn(model, batch):                     # (B,) per-example losses; their sum is backpropagated
        return per_example_loss(model(batch["x"]), batch["y"])

    attributor = Attributor(model, "*", loss_fn=loss_fn, projection=dict(k_in=16, k_out=16, seed=0),
                            curvature="ekfac")
    store = attributor.featurize(train, "train.store")                 # train: iterable of (ids, batch)
    attributor.fit(train, "curvature.safetensors", store=store)        # K-FAC pass + EK-FAC pass on the store
    scores = attributor.score(queries, store, topk=10)                 # Scores: values, indices, ids (q, 10)

Batches are iterables of ``(ids, batch)`` pairs: ``ids`` is a list (or 1-D
tensor) of B unique str/int example ids and ``batch`` is whatever ``loss_fn``
takes; tensors in it (also inside dicts, lists and tuples) are moved to
``device``. If ``batch`` is a mapping with an ``"attention_mask"`` (B, T), the
capture drops padding tokens (see :class:`airtrace.capture.GradientCapture`).

``loss_fn(model, batch) -> (B,)`` must return per-example losses with examples
that do not interact (the model is put in eval mode for every pass); their sum
is backpropagated, so each example's features are the gradient of its own loss.
Use :func:`airtrace.capture.per_example_loss` (and
:func:`airtrace.capture.response_labels` for instruction-tuned LMs), never a
batch mean. Backward is ``torch.autograd.grad`` to the tracked layers' outputs:
no weight gradient is formed (the features replace it) and the model's
``.grad`` fields are left untouched.

Features of an example are the concatenation over layers (layout order) of
its projected weight gradient:

- factored (LoGra, default ``projection=dict(k_in=16, k_out=16, seed=0)``):
  one block (k_out, k_in) per layer; a layer whose whole gradient has at
  most ``exact_budget`` entries (d_out x d_in; default 65536, 4096 for the
  dense curvatures fisher and lowrank) is kept
  unprojected (block (d_out, d_in)), and with ``exact_small=True`` (default)
  a side of another layer whose width d is at most its k is kept exact
  (block side d, identity projection);
- dense (TRAK, ``projection=dict(type="dense", k=1024, seed=0, kind="rademacher")``):
  the flattened per-example gradients of all layers times an implicit random
  (p, k) matrix, one block named "dense" of shape (1, k). Small models only;
  curvature identity, fisher or lowrank;
- sparse (``projection=dict(type="sparse", k=1024, s=2, seed=0)``): the same flattened
  gradients times an implicit sparse Johnson-Lindenstrauss matrix (s hashed ±1/sqrt(s) per
  gradient coordinate, :func:`airtrace.ops.project_sparse.project_sparse`): O(p s) work per
  example instead of O(p k); one block named "sparse" of shape (1, k); curvature as dense.

Precision: features are float32 (float64 for float64 models) until the store
casts them to its dtype; curvature sums accumulate in float64 over per-batch
products in the features' precision, and the factors are decomposed and
inverted in float64; scores accumulate in float32 (float64 for float64 models).
"""

from airtrace.attribute.attributor import Attributor
from airtrace.attribute.batches import as_batches
from airtrace.attribute.config import CURVATURES, DENSE, DENSE_BLOCK, FACTORED, SPARSE, projection_config
from airtrace.attribute.ensemble import score_ensemble
from airtrace.attribute.featurizer import DENSE_MATRIX_MAX_ENTRIES, Featurizer
from airtrace.attribute.task import Task, load_task
from airtrace.attribute.training import CheckpointCapture, checkpoints, score_checkpoints, trainer_callback

__all__ = [
    "Attributor",
    "CheckpointCapture",
    "CURVATURES",
    "DENSE",
    "DENSE_BLOCK",
    "DENSE_MATRIX_MAX_ENTRIES",
    "FACTORED",
    "SPARSE",
    "Featurizer",
    "Task",
    "as_batches",
    "checkpoints",
    "load_task",
    "projection_config",
    "score_checkpoints",
    "score_ensemble",
    "trainer_callback",
]
