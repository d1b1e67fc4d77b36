"""The development suite: six tasks, their attributed models, cached retrained ground truth and noise ceilings; imports
the other eval modules (the tasks on use).

Tasks (:data:`TASKS`): digits with an L2 logistic regression and an MLP
(:mod:`airtrace.eval.tasks.digits`), wine with the same two models and diabetes
with an MLP under squared error (:mod:`airtrace.eval.tasks.tabular`), and the
small GPT on chatterbot pairs (:mod:`airtrace.eval.tasks.lm`, "default" size).

Ground truth (:func:`ground_truth`): ``m`` random 50% subsets retrained for real
through :func:`airtrace.eval.retrain` (resumable, cached under
``$AIRTRACE_CACHE/eval/<config hash>/``). Every MLP and the GPT hold their
initial weights (and the GPT its example order) fixed across subsets, and the
logistic regressions are solved to their unique optimum, so a subset's model
does not depend on the training seed: the truth is deterministic, and the
attributed model (trained on every example, :func:`full_model`) starts from
the same weights as every subset model.

Noise ceiling (:func:`ceiling`): the same subsets retrained from other initial
weights (``init_seed`` and, for the GPT, ``order_seed`` = 1, 2, ...), and the
per-query Spearman correlation between those outputs and the truth, averaged
over queries: how much of the truth is specific to the one initialisation.
The logistic regressions have none (convex, seed-free: ceiling 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from airtrace.eval import metrics
from airtrace.eval.experiments import lds_ground_truth
from airtrace.eval.subsets import SubsetPlan

SUBSETS = 100
"""Default number of retrained subsets per task."""


def _digits(model: str):
    from airtrace.eval.tasks.digits import DigitsTask, digits_config

    return DigitsTask(digits_config(model))


def _tabular(dataset: str, model: str):
    from airtrace.eval.tasks.tabular import TabularTask, tabular_config

    return TabularTask(tabular_config(dataset, model))


def _lm():
    from airtrace.eval.tasks.lm import LMTask, lm_config

    return LMTask(lm_config("default"))


TASKS: dict[str, Callable[[], object]] = {
    "digits-logreg": lambda: _digits("logreg"),
    "digits-mlp": lambda: _digits("mlp"),
    "wine-logreg": lambda: _tabular("wine", "logreg"),
    "wine-mlp": lambda: _tabular("wine", "mlp"),
    "diabetes-mlp": lambda: _tabular("diabetes", "mlp"),
    "lm": _lm,
}
"""Suite task name -> task factory (the task's default configuration)."""


def task(name: str):
    """The suite task ``name`` (a key of :data:`TASKS`).

    Raises:
        ValueError: unknown name.
    """
    if name not in TASKS:
        raise ValueError(f"unknown suite task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]()


def is_lm(task) -> bool:
    return type(task).__name__ == "LMTask"


def full_model(task):
    """The attributed model: trained on every training example (the GPT's is cached beside its ground truth)."""
    if is_lm(task):
        from airtrace.eval.tasks import lm_eval

        return lm_eval.full_model(task)
    from airtrace.eval import experiments

    return experiments.full_model(task)


def ground_truth(task, m: int = SUBSETS, fraction: float = 0.5, plan_seed: int = 0,
                 progress: bool = False) -> tuple[SubsetPlan, torch.Tensor]:
    """(plan: masks (m, n) bool + seeds, outputs (m, q) float64) of ``m`` retrained subsets, cached."""
    return lds_ground_truth(task, m, fraction, plan_seed, progress)


def seed_free(task) -> bool:
    """True when a subset's model cannot depend on the initialisation (the convex logistic regressions)."""
    return getattr(task.config, "model", None) == "logreg"


def reinitialised(task, init: int):
    """The same task with initial weights (and the GPT's example order) drawn from ``init``."""
    config = replace(task.config, init_seed=init, **({"order_seed": init} if is_lm(task) else {}))
    return type(task)(config)


@dataclass(frozen=True)
class Ceiling:
    """Agreement of the truth with the same subsets retrained from other initial weights.

    Attributes:
        mean: mean over the other initialisations of the mean per-query Spearman (1.0 for a seed-free task).
        per_init: {init seed: mean per-query Spearman against the truth}.
        subsets: subsets compared (the first ``subsets`` of the truth's plan).
    """

    mean: float
    per_init: dict[int, float]
    subsets: int


def ceiling(task, m: int, inits: tuple[int, ...] = (1,), subsets: int = SUBSETS, fraction: float = 0.5,
            plan_seed: int = 0, progress: bool = False) -> Ceiling:
    """Retrain the first ``m`` subsets of the truth's plan from each initialisation of ``inits`` (cached).

    A plan of ``m`` subsets is the first ``m`` rows of the truth's plan of ``subsets`` (>= m) with the
    same seed (:func:`airtrace.eval.sample_subsets` draws them in order), so the truth is not retrained.
    """
    if seed_free(task):
        return Ceiling(1.0, {}, m)
    if m > subsets:
        raise ValueError(f"m ({m}) must be at most subsets ({subsets}), the truth it is compared with")
    truth = ground_truth(task, subsets, fraction, plan_seed, progress)[1][:m]
    per_init = {}
    for init in inits:
        _, other = ground_truth(reinitialised(task, init), m, fraction, plan_seed, progress)
        per_init[init] = float(metrics.spearman_columns(truth, other).mean())
    return Ceiling(sum(per_init.values()) / len(per_init), per_init, m)
