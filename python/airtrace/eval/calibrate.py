"""Self-calibration by real retraining: choose projection size x curvature x damping x metric by LDS on retrained random
subsets, cross-validated over the subsets, and write a calibration file; imports ``airtrace.attribute``,
``airtrace.curvature`` and the other eval modules.

Example::

    calibration = calibrate(model, loss_fn, train, queries, train_fn, measure_fn, "runs/calibrate", budget=64)
    at = calibration.attributor(model, loss_fn=loss_fn)        # the chosen layers / projection / curvature / damping
    store = at.featurize(train, "train.store"); at.fit(train, store=store)
    scores = at.score(queries, store, metric=calibration.metric)

The labels are the datamodel labels of :func:`airtrace.eval.retrain` (``ground_truth.safetensors``:
outputs (m, q), masks (m, n)), retrained under ``out/subsets/`` with one file per subset
(resumable), or read from ``labels=`` (e.g. a run of ``airtrace airrep label`` or of the
eval harness on the same training set and queries).

The projection of size k is the default factored rule at that size for the curvature (layers within the
curvature's exact budget unprojected, :func:`airtrace.attribute.config.default_exact_budget`: 65536 entries
for EK-FAC and K-FAC, 4096 for the dense Fisher; sides no wider than k exact, the rest projected to k).
Per projection size k and exact budget, one pass computes the training and query features and
each curvature is fitted once; every damping of the grid (relative factors and
"auto") and every metric then costs one matrix product in the curvature's
eigenbasis (:mod:`airtrace.eval.sweep`): with ``r = Qᵀ vec(ĝ)`` and
``w = 1 / (e + λ)`` per layer, inner ``Σ r_q w r_x``, cosine divides by
``‖w r_q‖ ‖r_x‖``, relative by ``sqrt(Σ w r_x²)``.

Cross-validation: the subsets are split into ``folds`` parts; for each part the
candidate with the best mean LDS on the other parts is chosen and its per-query
Spearman on the part is kept; the reported LDS is the mean over queries of
those held-out correlations (averaged over parts) with a bootstrap CI. The
settings written are the best candidate on all subsets.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from airtrace.attribute import Attributor
from airtrace.attribute.batches import pairs
from airtrace.attribute.calibration import Calibration
from airtrace.attribute.config import default_exact_budget, projection_config
from airtrace.curvature import MomentAccumulator
from airtrace.curvature.damping import auto_factors
from airtrace.eval import metrics
from airtrace.eval.retrain import load_ground_truth, retrain
from airtrace.eval.subsets import sample_subsets
from airtrace.eval.sweep import Spectral, spectral

F64 = torch.float64
SIZES = (8, 16, 32)
CURVATURES = ("ekfac", "kfac", "fisher")
FACTORS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
METRICS = ("inner", "cosine", "relative")
CALIBRATION_FILE = "calibration.json"


def _features(at: Attributor, batches) -> dict[str, torch.Tensor]:
    """{layer: (rows, k_out, k_in)} features of every batch, float64 on the CPU; row j is the example with id j when
    the ids are the positions 0..rows-1 in any batch order (batches grouped by length), else the j-th example."""
    ids, chunks = [], []
    for batch_ids, batch in pairs(batches, "batches"):
        ids.extend(batch_ids)
        chunks.append(at.features(batch).to(F64).cpu())
    rows = torch.cat(chunks)
    if all(isinstance(i, int) for i in ids) and sorted(ids) == list(range(len(ids))):
        rows = rows[torch.tensor(ids).argsort()]
    return at.featurizer.split(rows)


def candidate_scores(sp: Spectral, damping: dict[str, float], metric: str) -> torch.Tensor:
    """(q, n) float64 scores of one damping ({layer: λ}) and metric from features in a curvature's eigenbasis."""
    inner, q_sq, x_sq, self_inf = None, 0.0, 0.0, 0.0
    for name, e in sp.eigenvalues.items():
        w = 1.0 / (e + float(damping[name]))
        rq, rx = sp.query[name].to(F64), sp.train[name].to(F64)
        part = (rq * w) @ rx.T
        inner = part if inner is None else inner + part
        q_sq = q_sq + ((rq * w) ** 2).sum(1)
        x_sq = x_sq + (rx**2).sum(1)
        self_inf = self_inf + (rx**2 * w).sum(1)
    if metric == "inner":
        return inner
    if metric == "cosine":
        return inner / (q_sq.sqrt().clamp_min(1e-12)[:, None] * x_sq.sqrt().clamp_min(1e-12)[None, :])
    return inner / self_inf.clamp_min(0).sqrt().clamp_min(1e-12)[None, :]


def _per_query(scores: torch.Tensor, masks: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """(q,) Spearman of predicted and retrained outputs across the given subsets."""
    return metrics.spearman_columns(metrics.group_scores(scores, masks), outputs)


def _check_grid(sizes, curvatures, factors, auto, metrics_) -> None:
    bad = sorted(set(curvatures) - set(CURVATURES)) + sorted(set(metrics_) - set(METRICS))
    if bad or not curvatures or not metrics_ or not (sizes and (factors or auto)):
        raise ValueError(f"curvatures must be of {CURVATURES}, metrics of {METRICS}, and sizes and a damping given; "
                         f"got {bad or 'an empty grid'}")


def calibrate(model: nn.Module, loss_fn, train_batches, query_batches, train_fn: Callable | None,
              measure_fn: Callable | None, out: str | os.PathLike, *, budget: int = 64, fraction: float = 0.5,
              seed: int = 0, folds: int = 4, labels: str | os.PathLike | None = None, columns: slice | None = None,
              layers: str | Sequence[str] = ("*",), bias: bool = False, sizes: Sequence[int] = SIZES,
              curvatures: Sequence[str] = CURVATURES, factors: Sequence[float] = FACTORS,
              auto: bool = True, metrics_: Sequence[str] = METRICS, config: dict | None = None,
              progress: bool = True) -> Calibration:
    """Choose the attribution settings by cross-validated LDS against retrained subsets; write ``out/calibration.json``.

    Args:
        model: the trained model (on every training example).
        loss_fn: ``loss_fn(model, batch) -> (B,)`` per-example losses.
        train_batches, query_batches: re-iterable (ids, batch) pairs; the example with id j (ids 0..n-1 in any
            batch order; else the j-th example of the batches) is example j of ``train_fn``'s indices and query j
            of ``measure_fn``'s outputs.
        train_fn: ``train_fn(indices, seed) -> model`` trained from scratch on those examples (None with ``labels``).
        measure_fn: ``measure_fn(model) -> (q,)`` outputs of the queries, higher = fit better (None with ``labels``).
        out: folder (created): ``subsets/`` (the resumable retraining) and ``calibration.json``.
        budget: subsets retrained (``fraction`` of the training set each, plan seed ``seed``).
        folds: parts of the subsets for the cross-validation (2 <= folds <= subsets).
        labels: an existing ground-truth file or folder instead of retraining.
        columns: the labels' output columns of the queries (default all; the labels of
            ``airtrace airrep label`` hold the dev pairs first: ``slice(n_dev, None)``).
        layers, bias: the tracked layers, as for :class:`Attributor`.
        sizes: factored projection sizes k (k_in = k_out = k, seed 0, the default ``exact_small`` and the
            curvature's default ``exact_budget``: layers within the budget stay unprojected at every size).
        curvatures: of "ekfac", "kfac", "fisher".
        factors: relative damping factors (λ = factor × mean eigenvalue per layer).
        auto: also try ``damping="auto"``.
        metrics_: of "inner", "cosine", "relative".
        config: JSON-able description of the task for the retraining run's identity.
        progress: show progress bars.

    Returns:
        The :class:`Calibration` written to ``out/calibration.json``.

    Raises:
        ValueError: no labels and no train_fn / measure_fn, labels of another training set or queries,
            bad folds, or an unknown curvature / metric.
    """
    _check_grid(sizes, curvatures, factors, auto, metrics_)
    if labels is not None:
        outputs, plan, _ = load_ground_truth(labels)
        outputs = outputs[:, columns] if columns is not None else outputs
        label_path = labels
    else:
        if train_fn is None or measure_fn is None:
            raise ValueError("calibrate needs train_fn and measure_fn to retrain the subsets, or labels= a ground "
                             "truth of the same training set and queries")
        n = sum(len(ids) for ids, _ in pairs(train_batches, "train_batches"))
        plan = sample_subsets(n, budget, fraction, seed)
        outputs = retrain(plan, train_fn, measure_fn, Path(out) / "subsets", progress=progress, config=config)
        label_path = Path(out) / "subsets"
    calibration = choose(model, loss_fn, train_batches, query_batches, outputs, plan.masks, folds=folds, seed=seed,
                         layers=layers, bias=bias, sizes=sizes, curvatures=curvatures, factors=factors, auto=auto,
                         metrics_=metrics_, labels=os.fspath(Path(label_path).resolve()))
    Path(out).mkdir(parents=True, exist_ok=True)
    calibration.save(Path(out) / CALIBRATION_FILE)
    return calibration


def choose(model: nn.Module, loss_fn, train_batches, query_batches, outputs: torch.Tensor, masks: torch.Tensor, *,
           folds: int = 4, seed: int = 0, layers: str | Sequence[str] = ("*",), bias: bool = False,
           sizes: Sequence[int] = SIZES, curvatures: Sequence[str] = CURVATURES, factors: Sequence[float] = FACTORS,
           auto: bool = True, metrics_: Sequence[str] = METRICS, labels: str = "") -> Calibration:
    """The search of :func:`calibrate` on given labels: outputs (m, q) float64 and masks (m, n) bool.

    Args:
        labels: where the labels come from, recorded in the calibration.

    Returns:
        The :class:`Calibration` (not saved).

    Raises:
        ValueError: labels of another training set or queries, bad folds, or an unknown curvature / metric.
    """
    _check_grid(sizes, curvatures, factors, auto, metrics_)
    base = Attributor(model, layers, loss_fn=loss_fn, bias=bias, curvature="identity")
    n = sum(len(ids) for ids, _ in pairs(train_batches, "train_batches"))
    label_path = labels or "the labels"
    if masks.shape[1] != n:
        raise ValueError(f"{label_path}: the labels cover {masks.shape[1]} training examples, the batches {n}")
    m = masks.shape[0]
    if not isinstance(folds, int) or not 2 <= folds <= m:
        raise ValueError(f"folds must be an int in [2, {m}] (the subsets), got {folds!r}")
    part = torch.randperm(m, generator=torch.Generator().manual_seed(seed)) % folds  # fold of each subset

    names = [spec.name for spec in base.layers]
    candidates, held = [], []  # held[c]: (folds, q) per-query Spearman of candidate c on each part
    budgets = {}  # exact budget -> the curvatures whose default projection has it (one feature pass each)
    for method in curvatures:
        budgets.setdefault(default_exact_budget(method), []).append(method)
    for k, (budget, methods) in ((k, group) for k in sizes for group in budgets.items()):
        projection = projection_config({"type": "factored", "k_in": k, "k_out": k, "seed": 0, "exact_budget": budget})
        at = Attributor(model, names, loss_fn=loss_fn, bias=bias, projection=projection, curvature="identity")
        train, query = _features(at, train_batches), _features(at, query_batches)
        if outputs.shape[1] != next(iter(query.values())).shape[0]:
            raise ValueError(f"{label_path}: the labels measure {outputs.shape[1]} queries, the query batches hold "
                             f"{next(iter(query.values())).shape[0]}")
        moments = MomentAccumulator()
        moments.update(train)
        moments = moments.finalize()
        for method in methods:
            fitter = Attributor(model, names, loss_fn=loss_fn, bias=bias, projection=projection, curvature=method,
                                damping=None)
            sp = spectral(fitter.fit(train_batches, progress=False), train, query)
            options = [(f, {name: f for name in names}) for f in factors]
            if auto:
                options.append(("auto", auto_factors(method, moments)[0]))
            for label, layer_factors in options:
                damping = {name: layer_factors[name] * float(e.mean()) for name, e in sp.eigenvalues.items()}
                for metric in metrics_:
                    scores = candidate_scores(sp, damping, metric)
                    candidates.append({"k": k, "exact_budget": budget, "curvature": method, "damping": label,
                                       "metric": metric,
                                       "lds": float(_per_query(scores, masks, outputs).mean())})
                    held.append(torch.stack([_per_query(scores, masks[part == f], outputs[part == f])
                                             for f in range(folds)]))
    per_fold = torch.stack(held)  # (candidates, folds, q)
    fold_means = per_fold.mean(2)  # (candidates, folds)
    held_out = []
    for f in range(folds):
        others = [g for g in range(folds) if g != f]
        chosen = int(fold_means[:, others].mean(1).argmax())
        held_out.append(per_fold[chosen, f])
    held_out = torch.stack(held_out).mean(0)  # (q,) each query's held-out Spearman, averaged over parts
    best = max(range(len(candidates)), key=lambda c: candidates[c]["lds"])
    choice = candidates[best]
    lo, hi = metrics.bootstrap_ci(held_out)
    return Calibration(
        settings={"layers": names, "bias": bias,
                  "projection": projection_config({"type": "factored", "k_in": choice["k"], "k_out": choice["k"],
                                                   "seed": 0, "exact_budget": choice["exact_budget"]}),
                  "curvature": choice["curvature"], "damping": choice["damping"], "metric": choice["metric"]},
        lds={"mean": float(held_out.mean()), "ci": [lo, hi], "folds": folds, "subsets": m,
             "queries": int(held_out.numel()), "in_sample": choice["lds"]},
        grid=candidates, labels=labels)
