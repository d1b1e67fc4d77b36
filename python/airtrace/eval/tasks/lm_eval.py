"""LDS of airtrace's gradient methods on the causal-LM task (:mod:`airtrace.eval.tasks.lm`); imports
``airtrace.attribute`` and the other eval modules.

Pipeline (:func:`evaluate`):

1. Ground truth: :func:`ground_truth` retrains ``m`` models on random subsets
   (``fraction`` of the pool, seeds from :func:`airtrace.eval.sample_subsets`)
   with :func:`airtrace.eval.retrain`, resumable, under
   ``$AIRTRACE_CACHE/eval/<config hash>/lds-m<m>-f<fraction>-s<plan seed>/``
   (``airtrace.eval.cache_dir``; default root ``~/.cache/airtrace``).
2. The model trained on the whole pool (``config.seed``), cached in the same
   ``<config hash>`` folder as ``full-model.safetensors``.
3. For every method of :data:`METHODS` an :class:`airtrace.Attributor` on the
   full model featurizes the pool, fits its curvature and scores the queries
   (``metric="inner"``: ``H⁻¹ ĝ_q · ĝ_z``, higher = z helps the query), timed
   stage by stage; :func:`airtrace.eval.metrics.lds` compares the (q, n) scores
   with the retrained outputs.

Tracked layers: every nn.Linear of the model (attention ``qkv`` / ``proj``,
MLP ``fc`` / ``proj`` of each block, and ``lm_head``); the embeddings are not tracked.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from airtrace.attribute import Attributor
from airtrace.eval import cache_dir, metrics
from airtrace.eval.experiments import lds_ground_truth, score_all
from airtrace.eval.subsets import SubsetPlan
from airtrace.eval.tasks.lm import GPT, LMConfig, LMTask

LAYERS = ("blocks.*", "lm_head")
METHODS: dict[str, dict] = {
    "logra-identity": dict(projection=dict(k_in=16, k_out=16, seed=0, exact_small=False), curvature="identity",
                           bias=False),
    "logra-ekfac": dict(projection=dict(k_in=16, k_out=16, seed=0, exact_small=False), curvature="ekfac", bias=False),
    "trak-dense": dict(projection=dict(type="dense", k=4096, seed=0), curvature="identity", bias=False),
}
"""Attributor settings per method: LoGra (factored 16 x 16 per layer, every side projected) with
identity or EK-FAC curvature, and TRAK-style dense projection (Rademacher, k = 4096) of the
flattened gradient of all tracked layers; weights only (no biases), as the recorded results."""
FULL_MODEL_FILE = "full-model.safetensors"


@dataclass
class MethodResult:
    """One method's LDS and stage times.

    Attributes:
        method: name (a key of :data:`METHODS`).
        lds: :class:`airtrace.eval.metrics.LDSResult`.
        featurize_s: seconds to write the training features.
        fit_s: seconds to fit the curvature.
        score_s: seconds to score the queries against the store.
        scores: (q, n) float64 scores, rows = queries, columns = training pool rows.
    """

    method: str
    lds: metrics.LDSResult
    featurize_s: float
    fit_s: float
    score_s: float
    scores: torch.Tensor


def task_dir(task: LMTask) -> Path:
    """The cache folder of the task, ``airtrace.eval.cache_dir(task.config_dict)`` (created)."""
    return cache_dir(task.config_dict)


def full_model(task: LMTask, cache: bool = True) -> GPT:
    """The model trained on the whole pool with ``config.seed``; cached in :func:`task_dir` when ``cache``."""
    path = task_dir(task) / FULL_MODEL_FILE if cache else None
    model = task.new_model(0)
    if path is not None and path.is_file():
        model.load_state_dict(load_file(os.fspath(path)))
        return model.eval()
    model = task.train_fn(torch.arange(task.n_train), task.config.seed)
    if path is not None:
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.fspath(tmp))
        os.replace(tmp, path)
    return model


def ground_truth(task: LMTask, m: int = 32, fraction: float = 0.5, plan_seed: int = 0, *,
                 progress: bool = True) -> tuple[torch.Tensor, SubsetPlan]:
    """Retrain ``m`` subset models and measure the queries; resumable, cached in
    ``task_dir(task) / "lds-m<m>-f<fraction>-s<plan_seed>"``.

    Returns:
        (outputs (m, n_query) float64, the plan: masks (m, n_train) bool and seeds).
    """
    plan, outputs = lds_ground_truth(task, m, fraction, plan_seed, progress)
    return outputs, plan


def attribute(task: LMTask, model: GPT, method: str | Mapping, workdir: str | os.PathLike, *,
              layers: Sequence[str] = LAYERS, batch_size: int = 32, progress: bool = True) -> tuple[torch.Tensor, dict]:
    """Score every query against every training pair with one method.

    Args:
        task: the task (pool and queries).
        model: the model the features are taken from (the full model).
        method: a key of :data:`METHODS` or Attributor keyword arguments (projection, curvature, ...).
        workdir: folder for the store and the curvature (created; overwritten).
        layers: tracked layer patterns.
        batch_size: examples per featurize / fit batch.
        progress: show progress bars.

    Returns:
        (scores (n_query, n_train) float64 in task order, {"featurize_s", "fit_s", "score_s"}).
    """
    if isinstance(method, str) and method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {list(METHODS)}")
    settings = METHODS[method] if isinstance(method, str) else dict(method)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    attributor = Attributor(model, list(layers), loss_fn=task.loss_fn, **settings)
    train = task.train_batches(batch_size)
    attributor.features(train[0][1])  # untimed warm-up: first-call costs (kernel loading) stay out of the times
    run = score_all(attributor, train, task.query_batches(batch_size), workdir, total=task.n_train, progress=progress)
    scores = torch.empty_like(run.scores)
    rows, cols = torch.tensor(run.query_ids), torch.tensor(run.store.ids)
    scores[rows[:, None], cols[None, :]] = run.scores
    return scores, run.times


def evaluate(config: LMConfig | None = None, methods: Sequence[str] | Mapping[str, Mapping] = tuple(METHODS),
             m: int = 32, fraction: float = 0.5, plan_seed: int = 0, *, bootstrap: int = 1000,
             workdir: str | os.PathLike | None = None, progress: bool = True) -> list[MethodResult]:
    """Ground truth (cached) and LDS of each method on the task.

    Args:
        config: the task configuration (default :class:`LMConfig`).
        methods: keys of :data:`METHODS`, or {name: Attributor keyword arguments}.
        m: retrained subsets.
        fraction: subset size over the pool.
        plan_seed: seed of the subset plan.
        bootstrap: resamples for the LDS confidence interval.
        workdir: folder for stores and curvatures (default: a temporary folder, removed after).
        progress: show progress bars.

    Returns:
        One :class:`MethodResult` per method, in ``methods`` order.
    """
    if not isinstance(methods, Mapping):
        unknown = [name for name in methods if name not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {list(METHODS)}")
        methods = {name: METHODS[name] for name in methods}
    task = LMTask(config)
    outputs, plan = ground_truth(task, m, fraction, plan_seed, progress=progress)
    model = full_model(task)
    with tempfile.TemporaryDirectory(prefix="airtrace-lm-") as tmp:
        base = Path(workdir) if workdir is not None else Path(tmp)
        results = []
        for name, settings in methods.items():
            scores, times = attribute(task, model, settings, base / name, progress=progress)
            result = metrics.lds(scores, plan.masks, outputs, bootstrap=bootstrap)
            results.append(MethodResult(name, result, scores=scores, **times))
    return results
