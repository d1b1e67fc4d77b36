"""The retraining driver: train one model per subset of a plan and measure it on the queries; imports
``airtrace.eval.subsets`` and ``airtrace.util``.

``retrain`` is resumable. ``out_dir`` holds:

- ``plan.safetensors``: the :class:`~airtrace.eval.subsets.SubsetPlan`, with the
  run key (plan digest + config hash) in its metadata;
- ``subset-<j>.safetensors``: ``{"output": (q,) float64}`` of every finished
  subset j, written to a temporary file and renamed, so a killed run leaves only
  whole files and a rerun trains just the missing subsets;
- ``ground_truth.safetensors``: ``{"outputs": (m, q) float64, "masks": (m, n) bool}``
  with the seeds, plan digest and config hash in its metadata, once every subset
  is done.

Sign convention: ``measure_fn`` returns "higher = the query is fit better"
(negative loss or margin).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from airtrace.eval.subsets import SubsetPlan, _check_int
from airtrace.util.cache import config_hash
from airtrace.util.progress import progress_bar

METADATA_KEY = "airtrace.eval"
PLAN_FILE = "plan.safetensors"
GROUND_TRUTH_FILE = "ground_truth.safetensors"

TrainFn = Callable[[torch.Tensor, int], object]
MeasureFn = Callable[[object], torch.Tensor]


def _run_key(plan: SubsetPlan, config: dict | None) -> tuple[str, str]:
    """(run key, config hash): the identity of a run, kept in every file it writes."""
    chash = config_hash(config if config is not None else {})
    return f"{plan.digest}-{chash}", chash


def _metadata(path: Path) -> dict | None:
    """The ``airtrace.eval`` metadata of a safetensors file, None when it is missing or unreadable."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
        return None if raw is None else json.loads(raw)
    except (SafetensorError, OSError, json.JSONDecodeError):
        return None


def _save(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, os.fspath(tmp), metadata={METADATA_KEY: json.dumps(meta)})
    os.replace(tmp, path)


def _measured(value, j: int, seed: int, q: int | None) -> torch.Tensor:
    """measure_fn's result for subset j as a checked (q,) float64 CPU tensor."""
    where = f"measure_fn for subset {j} (seed {seed})"
    if value is None:
        raise ValueError(f"{where} returned None; it must return a (q,) tensor of per-query outputs")
    if isinstance(value, torch.Tensor):
        out = value.detach().to("cpu", torch.float64)
    else:
        try:
            out = torch.as_tensor(np.asarray(value, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where} returned {type(value).__name__}, not a (q,) tensor of numbers") from exc
    if out.dim() != 1 or out.numel() == 0:
        raise ValueError(f"{where} returned shape {tuple(out.shape)}; it must be a non-empty (q,) vector, "
                         "one output per query")
    if q is not None and out.numel() != q:
        raise ValueError(f"{where} returned {out.numel()} outputs, earlier subsets returned q = {q}")
    bad = int((~torch.isfinite(out)).sum())
    if bad:
        raise ValueError(f"{where} returned {bad} NaN/Inf value(s) of {out.numel()}; a diverged training run? "
                         "Fix the training (learning rate, steps) before measuring")
    return out.contiguous()


def _subset_path(out_dir: Path, j: int) -> Path:
    return out_dir / f"subset-{j:05d}.safetensors"


def _finished(path: Path, key: str, q: int | None) -> torch.Tensor | None:
    """The stored output of one subset when the file is whole and belongs to this run, else None."""
    meta = _metadata(path)
    if meta is None or meta.get("key") != key:
        return None
    with safe_open(os.fspath(path), framework="pt") as f:
        out = f.get_tensor("output") if "output" in f.keys() else None
    if out is None or out.dim() != 1 or (q is not None and out.numel() != q):
        return None
    return out.to(torch.float64)


def _claim(out_dir: Path, plan: SubsetPlan, key: str, chash: str) -> None:
    """Record the plan in ``out_dir``, or check that the run already there is this one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plan_path = out_dir / PLAN_FILE
    if plan_path.exists():
        meta = _metadata(plan_path)
        if meta is None or meta.get("key") != key:
            theirs = "an unreadable plan" if meta is None else f"run {meta.get('key')}"
            raise ValueError(f"{out_dir}: holds {theirs}, not this plan / config (run {key}); "
                             "use another out_dir or delete this one")
        return
    unrelated = sorted(p.name for p in out_dir.glob("subset-*.safetensors"))
    if unrelated:
        raise ValueError(f"{out_dir}: holds subset files ({unrelated[0]}, ...) but no {PLAN_FILE}; "
                         "use another out_dir or delete this one")
    plan.save(plan_path, metadata={METADATA_KEY: json.dumps({"key": key, "config_hash": chash})})


def load_ground_truth(path: str | os.PathLike) -> tuple[torch.Tensor, SubsetPlan, dict]:
    """Read ``ground_truth.safetensors`` (or the folder holding it).

    Returns:
        (outputs (m, q) float64, the plan (masks (m, n) bool + seeds), metadata dict with
        ``key``, ``plan``, ``config_hash``, ``seeds``).

    Raises:
        ValueError: missing or unreadable file, or not written by :func:`retrain`.
    """
    path = Path(path)
    if path.is_dir():
        path = path / GROUND_TRUTH_FILE
    meta = _metadata(path)
    if meta is None:
        raise ValueError(f"{path}: not a ground-truth file written by airtrace.eval.retrain "
                         "(missing, unreadable or without airtrace.eval metadata)")
    with safe_open(os.fspath(path), framework="pt") as f:
        outputs, masks = f.get_tensor("outputs"), f.get_tensor("masks")
    return outputs, SubsetPlan(masks, meta["seeds"]), meta


def retrain(plan: SubsetPlan, train_fn: TrainFn, measure_fn: MeasureFn, out_dir: str | os.PathLike, *,
            progress: bool = True, config: dict | None = None) -> torch.Tensor:
    """Train a model on every subset of ``plan``, measure it, and keep the outputs on disk.

    Subsets already finished in ``out_dir`` (by an interrupted run of the same
    plan and config) are loaded, not retrained; a finished run returns the
    stored ground truth at once.

    Args:
        plan: the subsets and their seeds.
        train_fn: ``train_fn(indices (n_j,) int64, seed) -> model``, trained from scratch on
            ``train[indices]``; must be deterministic for a result that does not depend on resuming.
        measure_fn: ``measure_fn(model) -> (q,)`` per-query outputs (higher = fit better), the
            queries closed over; any float dtype, returned as float64.
        out_dir: folder of this run (created).
        progress: show a progress bar (models/s, ETA).
        config: JSON-able description of the task (model, data, training settings); its hash is part
            of the run's identity, so a folder of another task is refused rather than mixed in.

    Returns:
        (m, q) float64 outputs; row j is the model trained on subset j.

    Raises:
        ValueError: ``out_dir`` holds a run of another plan or config; ``train_fn`` returned None;
            ``measure_fn`` returned a wrong shape, a q that differs between subsets, or NaN/Inf.
    """
    if not isinstance(plan, SubsetPlan):
        raise ValueError(f"plan must be a SubsetPlan (airtrace.eval.sample_subsets), got {type(plan).__name__}")
    for name, fn in (("train_fn", train_fn), ("measure_fn", measure_fn)):
        if not callable(fn):
            raise ValueError(f"{name} must be callable, got {fn!r}")
    out_dir = Path(out_dir)
    key, chash = _run_key(plan, config)
    _claim(out_dir, plan, key, chash)
    gt_path = out_dir / GROUND_TRUTH_FILE
    if (_metadata(gt_path) or {}).get("key") == key:
        return load_ground_truth(gt_path)[0]

    rows: list[torch.Tensor | None] = [None] * plan.m
    q = None
    for j in range(plan.m):
        rows[j] = _finished(_subset_path(out_dir, j), key, q)
        if rows[j] is not None:
            q = rows[j].numel()
    done = sum(r is not None for r in rows)
    with progress_bar(plan.m, "retrain", progress, initial=done) as bar:
        bar.unit = "model"
        for j in range(plan.m):
            if rows[j] is not None:
                continue
            seed = plan.seeds[j]
            model = train_fn(plan.indices(j), seed)
            if model is None:
                raise ValueError(f"train_fn returned None for subset {j} (seed {seed}); it must return the "
                                 "trained model, which measure_fn then takes")
            rows[j] = _measured(measure_fn(model), j, seed, q)
            q = rows[j].numel()
            _save(_subset_path(out_dir, j), {"output": rows[j]}, {"key": key, "index": j, "seed": seed})
            bar.update(1)
    outputs = torch.stack(rows)
    meta = {"key": key, "plan": plan.digest, "config_hash": chash, "seeds": plan.seeds}
    _save(gt_path, {"outputs": outputs, "masks": plan.masks}, meta)
    return outputs


def leave_one_out(n: int, train_fn: TrainFn, measure_fn: MeasureFn, out_dir: str | os.PathLike, *,
                  indices: Sequence[int] | torch.Tensor | None = None, seed: int = 0, progress: bool = True,
                  config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave-one-out retraining: the full model, then one model without each of ``indices``.

    Runs :func:`retrain` on a plan whose row 0 is the full set and row 1 + r
    drops ``indices[r]``; every model is trained with the same ``seed``, so for a
    deterministic ``train_fn`` the only difference is the missing example.

    Args:
        n: training examples (>= 2).
        train_fn, measure_fn, out_dir, progress, config: as for :func:`retrain`.
        indices: the examples to leave out (default: all n), unique, in [0, n).
        seed: training seed of every model.

    Returns:
        ``(full (q,), removed (len(indices), q))`` float64; the LOO effect of removing
        ``indices[r]`` on query i is ``full[i] - removed[r, i]``.

    Raises:
        ValueError: bad n, seed or indices, or any error of :func:`retrain`.
    """
    _check_int("n", n, 2)
    _check_int("seed", seed, 0)
    rows = torch.arange(n) if indices is None else torch.as_tensor(indices).flatten()
    if rows.dtype.is_floating_point or rows.dtype == torch.bool or rows.numel() == 0:
        raise ValueError(f"indices must be a non-empty sequence of ints, got {rows.dtype} with {rows.numel()} entries")
    if int(rows.min()) < 0 or int(rows.max()) >= n or rows.unique().numel() != rows.numel():
        raise ValueError(f"indices must be unique ints in [0, {n}), got values in "
                         f"[{int(rows.min())}, {int(rows.max())}] with {rows.numel() - rows.unique().numel()} repeats")
    masks = torch.ones(1 + rows.numel(), n, dtype=torch.bool)
    masks[torch.arange(1, 1 + rows.numel()), rows] = False
    plan = SubsetPlan(masks, [seed] * masks.shape[0])
    outputs = retrain(plan, train_fn, measure_fn, out_dir, progress=progress, config=config)
    return outputs[0], outputs[1:]
