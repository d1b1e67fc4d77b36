"""Attribution methods and the evaluation experiments (LDS, LOO, mislabel detection, top-k removal) on a task; imports
the pipeline and the other eval modules.

A task (e.g. :class:`airtrace.eval.tasks.digits.DigitsTask`) provides
``config_dict``, ``n_train``, ``train_fn(indices, seed)``, ``measure_fn(model)``,
``loss_fn(model, batch)``, ``train_batches()`` and ``query_batches()``.
Retrained ground truth is cached under ``cache_dir(task.config_dict)``
(:func:`airtrace.eval.cache_dir`); the attributed model is the one trained on
every example with seed 0.

Methods (:data:`METHODS`): Attributor configurations with the factored
(LoGra) projection and identity / K-FAC / EK-FAC / damped Fisher / low-rank
curvature, the dense (TRAK) projection with the damped Fisher, and ``"exact"``:
flat per-example gradients of every parameter preconditioned with the exact
Hessian of the regularised training objective (tasks with ``data_hessian``,
i.e. the logistic regression), ``H = H_data + l2 I`` applied as a damped
Fisher curvature with absolute damping ``l2``.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from airtrace import curvature as cv
from airtrace.attribute import Attributor
from airtrace.eval import metrics
from airtrace.eval.cache import cache_dir
from airtrace.eval.retrain import leave_one_out, retrain
from airtrace.eval.subsets import sample_subsets
from airtrace.store import Store

F64 = torch.float64
EXACT = "exact"
METHODS = {
    "identity": dict(curvature="identity"),
    "kfac": dict(curvature="kfac"),
    "ekfac": dict(curvature="ekfac"),
    "fisher": dict(curvature="fisher"),
    "lowrank": dict(curvature="lowrank"),
    "trak": dict(curvature="fisher", dense=True),
    EXACT: {},
}
"""Method name -> Attributor settings (``dense``: the TRAK projection)."""
FULL_SEED = 0


@dataclass(frozen=True)
class ScoreRun:
    """Every query scored against every training example by one Attributor (:func:`score_all`).

    Attributes:
        scores: (q, n) float64, queries in batch order x the store's rows.
        query_ids: ids of the score rows.
        store: the training feature store (its ``ids`` name the columns).
        times: wall seconds of "featurize_s", "fit_s" and "score_s".
    """

    scores: torch.Tensor
    query_ids: list
    store: Store
    times: dict[str, float]


def score_all(attributor: Attributor, train, queries, workdir: str | os.PathLike, *, total: int | None = None,
              progress: bool = False) -> ScoreRun:
    """featurize ``train`` -> fit -> the full (q, n) score matrix of ``queries``, each step timed.

    Writes the store, the curvature and the score matrix under ``workdir`` (existing ones are replaced).
    """
    times = {}
    start = time.perf_counter()
    store = attributor.featurize(train, os.path.join(workdir, "store"), dtype="float32", total=total,
                                 overwrite=True, progress=progress)
    times["featurize_s"] = time.perf_counter() - start
    start = time.perf_counter()
    attributor.fit(train, os.path.join(workdir, "curvature.safetensors"), store=store, total=total, progress=progress)
    times["fit_s"] = time.perf_counter() - start
    start = time.perf_counter()
    path = os.path.join(workdir, "scores.safetensors")
    result = attributor.score(queries, store, topk=1, full_matrix_path=path, progress=progress)
    times["score_s"] = time.perf_counter() - start
    with safe_open(path, framework="pt") as f:
        scores = f.get_tensor("scores").to(F64)
    return ScoreRun(scores, result.query_ids, store, times)


@dataclass(frozen=True)
class Attribution:
    """Scores of one method.

    Attributes:
        scores: (q, n) float64 query x train scores (higher = helps the query).
        self_influence: (n,) float64 ``g_zᵀ H⁻¹ g_z``.
        seconds: wall time of featurize + fit + score + self-influence.
    """

    scores: torch.Tensor
    self_influence: torch.Tensor
    seconds: float


def check_methods(methods, task) -> list[str]:
    """The methods, checked: known names, and "exact" only for tasks with an exact Hessian."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    if EXACT in methods and not hasattr(task, "data_hessian"):
        raise ValueError("method 'exact' needs a task with a closed-form Hessian (digits --model logreg)")
    if EXACT in methods and getattr(task.config, "model", None) != "logreg":
        raise ValueError("method 'exact' is defined for the convex logistic regression only (--model logreg)")
    return list(methods)


def exact_influence(task, model) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact influence ``g_qᵀ (H_data + l2 I)⁻¹ g_z`` over every parameter.

    Returns:
        (scores (q, n), self-influence (n,)), float64.
    """
    g_train = task.flat_gradients(model, task.x_train, task.y_train)
    g_query = task.flat_gradients(model, task.x_query, task.y_query)
    p = g_train.shape[1]
    hessian = task.data_hessian(model).reshape(1, p, 1, p)
    curvature = cv.damped_fisher({"flat": hessian}, cv.Damping(value=task.config.l2), task.n_train)
    pre_query = curvature.precondition({"flat": g_query[:, None, :]})["flat"][:, 0, :]
    pre_train = curvature.precondition({"flat": g_train[:, None, :]})["flat"][:, 0, :]
    return pre_query @ g_train.T, (pre_train * g_train).sum(dim=1)


def attribute(task, model, method: str, *, projection: dict | None = None, dense_k: int = 512,
              progress: bool = False) -> Attribution:
    """Score every query against every training example with one method.

    Args:
        task: the task.
        model: the trained model to attribute.
        method: a key of :data:`METHODS`.
        projection: factored projection dict (default k_in = k_out = 16, seed 0).
        dense_k: dense projection dimension of "trak".
        progress: show the Attributor's progress bars.
    """
    start = time.perf_counter()
    if method == EXACT:
        scores, self_influence = exact_influence(task, model)
        return Attribution(scores, self_influence, time.perf_counter() - start)
    settings = dict(METHODS[method])
    dense = settings.pop("dense", False)
    projection = {"type": "dense", "k": dense_k, "seed": 0} if dense else projection
    attributor = Attributor(model, "*", loss_fn=task.loss_fn, bias=True, projection=projection, **settings)
    with tempfile.TemporaryDirectory(prefix="airtrace-eval-") as tmp:
        run = score_all(attributor, task.train_batches(), task.query_batches(), tmp, total=task.n_train,
                        progress=progress)
        self_influence = attributor.self_influence(run.store, progress=progress).to(F64)
    return Attribution(run.scores, self_influence, time.perf_counter() - start)


def full_model(task):
    """The attributed model: trained on every example with seed 0."""
    return task.train_fn(torch.arange(task.n_train), FULL_SEED)


def _run_dir(task, name: str) -> Path:
    return cache_dir(task.config_dict) / name


def lds_ground_truth(task, subsets: int, fraction: float = 0.5, seed: int = 0, progress: bool = True):
    """(plan, outputs (m, q)) of ``subsets`` retrained models, cached."""
    plan = sample_subsets(task.n_train, subsets, fraction, seed)
    out_dir = _run_dir(task, f"lds-m{subsets}-f{fraction:g}-s{seed}")
    return plan, retrain(plan, task.train_fn, task.measure_fn, out_dir, progress=progress, config=task.config_dict)


def run_lds(task, methods, subsets: int = 50, fraction: float = 0.5, seed: int = 0, progress: bool = True,
            **attribute_kwargs) -> list[dict]:
    """LDS of each method against ``subsets`` retrained models.

    Returns:
        One row per method: ``method, lds, ci_lo, ci_hi, seconds`` (attribution wall time).
    """
    methods = check_methods(methods, task)
    plan, outputs = lds_ground_truth(task, subsets, fraction, seed, progress)
    model = full_model(task)
    rows = []
    for method in methods:
        attribution = attribute(task, model, method, **attribute_kwargs)
        result = metrics.lds(attribution.scores, plan.masks, outputs)
        rows.append({"method": method, "lds": result.mean, "ci_lo": result.ci[0], "ci_hi": result.ci[1],
                     "seconds": attribution.seconds})
    return rows


def run_loo(task, methods, n_removed: int = 100, seed: int = 0, progress: bool = True,
            **attribute_kwargs) -> list[dict]:
    """Correlation of each method's scores with true leave-one-out effects on ``n_removed`` examples.

    The removed examples are a seeded random choice; the retrains of a logistic
    regression are warm-started from the full solution (same optimum).

    Returns:
        One row per method: ``method, loo_pearson, loo_spearman, seconds``.
    """
    methods = check_methods(methods, task)
    n_removed = min(n_removed, task.n_train)
    indices = torch.randperm(task.n_train, generator=torch.Generator().manual_seed(seed))[:n_removed]
    model = full_model(task)
    warm = getattr(task.config, "model", None) == "logreg"

    def train_fn(rows, train_seed):
        return task.train_fn(rows, train_seed, init=model) if warm else task.train_fn(rows, train_seed)

    full, removed = leave_one_out(task.n_train, train_fn, task.measure_fn, _run_dir(task, f"loo-r{n_removed}-s{seed}"),
                                  indices=indices, seed=FULL_SEED, progress=progress, config=task.config_dict)
    actual = full[:, None] - removed.T  # (q, n_removed)
    rows = []
    for method in methods:
        attribution = attribute(task, model, method, **attribute_kwargs)
        result = metrics.loo_correlation(attribution.scores[:, indices], actual)
        rows.append({"method": method, "loo_pearson": result["pearson"], "loo_spearman": result["spearman"],
                     "seconds": attribution.seconds})
    return rows


def run_mislabel(task, methods, **attribute_kwargs) -> list[dict]:
    """Mislabel detection AUC of each method's self-influence; ``task`` must have flipped labels.

    Returns:
        One row per method: ``method, mislabel_auc, seconds``.
    """
    methods = check_methods(methods, task)
    if not bool(task.flipped.any()):
        raise ValueError("the task has no flipped labels; build it with flip_fraction > 0")
    model = full_model(task)
    rows = []
    for method in methods:
        attribution = attribute(task, model, method, **attribute_kwargs)
        rows.append({"method": method, "mislabel_auc": metrics.mislabel_auc(attribution.self_influence, task.flipped),
                     "seconds": attribution.seconds})
    return rows


def run_topk(task, methods, k: int = 20, n_queries: int = 10, seed: int = 0, progress: bool = True,
             **attribute_kwargs) -> list[dict]:
    """Top-k removal: retrain without each of the first ``n_queries`` queries' top-k proponents, and k random.

    Returns:
        One row per method: ``method, topk_change, random_change`` (mean over queries of
        ``full - retrained`` output; higher = the removed examples helped the query more), ``seconds``.
    """
    methods = check_methods(methods, task)
    model = full_model(task)
    full = task.measure_fn(model)[:n_queries]

    def measure(m):
        return task.measure_fn(m)[:n_queries]

    rows = []
    for method in methods:
        attribution = attribute(task, model, method, **attribute_kwargs)
        plan = metrics.topk_removal_plan(attribution.scores[:n_queries], k, seed, train_seed=FULL_SEED)
        out_dir = _run_dir(task, f"topk-{method}-k{k}-q{n_queries}-s{seed}")
        outputs = retrain(plan, task.train_fn, measure, out_dir, progress=progress, config=task.config_dict)
        result = metrics.topk_removal(full, outputs)
        rows.append({"method": method, "topk_change": result.mean_topk, "random_change": result.mean_random,
                     "seconds": attribution.seconds})
    return rows
