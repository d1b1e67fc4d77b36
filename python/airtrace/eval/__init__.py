"""Evaluation by real retraining (an app): subset plans, a resumable retraining driver and attribution metrics; its
modules import the library and the data layer, no other app.

Example::

    from airtrace.eval import sample_subsets, retrain, metrics

    plan = sample_subsets(n, m=50, fraction=0.5, seed=0)
    outputs = retrain(plan, train_fn, measure_fn, "runs/lds")     # (m, q) float64, resumable
    result = metrics.lds(scores, plan.masks, outputs)             # scores (q, n) from an Attributor
    print(result.mean, result.ci)

See :mod:`airtrace.eval.retrain` for the on-disk layout and
:mod:`airtrace.eval.metrics` for the sign conventions; built-in benchmark
tasks live in :mod:`airtrace.eval.tasks`.
"""

from airtrace.eval import metrics
from airtrace.eval.cache import cache_dir
from airtrace.eval.retrain import leave_one_out, load_ground_truth, retrain
from airtrace.eval.subsets import SubsetPlan, sample_subsets
from airtrace.util.cache import cache_root, config_hash

__all__ = [
    "SubsetPlan",
    "cache_dir",
    "cache_root",
    "config_hash",
    "leave_one_out",
    "load_ground_truth",
    "metrics",
    "retrain",
    "sample_subsets",
]
