"""Features captured during fine-tuning (``CheckpointCapture``: a plain-loop hook, and ``trainer_callback`` for a
Hugging Face ``Trainer``) and checkpoint-weighted scoring over them (``score_checkpoints``, TracIn-CP); imports the
other attribute modules, ``airtrace.scoring`` and ``airtrace.store``.

At each chosen step the capture featurizes the training set with the weights of
that moment into ``<out>/step-<step>`` (a store), saves the trainable parameters
(``<out>/step-<step>.weights.safetensors``: all of them for full fine-tuning, the
adapter for LoRA) and records the step and the learning rate in effect in
``<out>/checkpoints.json``. ``score_checkpoints`` then loads each checkpoint's
weights, scores the queries against its store and sums the score matrices
weighted by the learning rates (``Σ_c η_c q̃_c · ĝ_c``), the TracIn-CP estimate;
with a curvature other than "identity" each checkpoint's curvature is fitted on
its own store. The model's weights are restored afterwards.

The capture is a separate forward/backward pass over the training set per
checkpoint (the training steps' own backward is a batch mean over shuffled
examples), so its cost is that of one featurize per checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from airtrace.attribute.attributor import Attributor
from airtrace.attribute.batches import Batches, as_batches
from airtrace.scoring import Scores, check_order, split_signed
from airtrace.store import Store

INDEX = "checkpoints.json"


@dataclass
class Checkpoint:
    """One captured checkpoint (an entry of ``checkpoints.json``).

    Attributes:
        step: the optimizer step after which it was captured.
        learning_rate: the learning rate in effect at that step (the checkpoint's TracIn weight).
        store: folder name of its feature store.
        weights: file name of its trainable parameters (safetensors).
    """

    step: int
    learning_rate: float
    store: str
    weights: str


def checkpoints(out: str | os.PathLike) -> list[Checkpoint]:
    """The checkpoints captured into ``out``, by step.

    Raises:
        ValueError: ``out`` holds no readable ``checkpoints.json``.
    """
    path = Path(out) / INDEX
    try:
        entries = json.loads(path.read_text())
        return sorted((Checkpoint(**e) for e in entries), key=lambda c: c.step)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: no checkpoint index ({exc}); capture checkpoints with CheckpointCapture first") \
            from None


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


class CheckpointCapture:
    """Captures training-set features at chosen steps of a training loop (see the module docstring).

    Example (a plain loop)::

        capture = CheckpointCapture(attributor, train_batches, "ckpts", steps=[100, 200, 300])
        for step, batch in enumerate(loader, 1):
            loss = model(**batch).loss
            loss.backward(); optimizer.step(); scheduler.step(); optimizer.zero_grad()
            capture.step(step, optimizer.param_groups[0]["lr"])

    Args:
        attributor: an Attributor on the model being trained (same module object).
        train: the training examples to featurize at each checkpoint, as ``featurize`` takes them.
        out: folder for the stores, weights and ``checkpoints.json`` (created).
        steps: the steps to capture at.
        every: or capture every ``every`` steps.
        dtype: stored feature dtype.
        progress: show featurize's progress bar.
    """

    def __init__(self, attributor: Attributor, train: Batches, out: str | os.PathLike, *,
                 steps: Iterable[int] | None = None, every: int | None = None, dtype: str = "bfloat16",
                 progress: bool = False):
        if (steps is None) == (every is None):
            raise ValueError("give exactly one of steps=[...] or every=N")
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.attributor, self.train = attributor, as_batches(train)
        self.out, self.dtype, self.progress = Path(out), dtype, progress
        self.steps = None if steps is None else {int(s) for s in steps}
        self.every = every
        self.out.mkdir(parents=True, exist_ok=True)
        index = self.out / INDEX
        self.captured = checkpoints(self.out) if index.exists() else []

    def due(self, step: int) -> bool:
        """Whether ``step`` is a chosen one (and not captured yet)."""
        chosen = step in self.steps if self.steps is not None else step % self.every == 0
        return chosen and all(c.step != step for c in self.captured)

    def step(self, step: int, learning_rate: float) -> Store | None:
        """Call after every optimizer step: captures when ``step`` is due; returns the new store or None."""
        return self.capture(step, learning_rate) if self.due(step) else None

    def capture(self, step: int, learning_rate: float) -> Store:
        """Featurize the training set with the current weights as checkpoint ``step``."""
        if not (isinstance(learning_rate, (int, float)) and learning_rate >= 0):
            raise ValueError(f"learning_rate must be a number >= 0, got {learning_rate!r}")
        name = f"step-{step:08d}"
        store = self.attributor.featurize(self.train, self.out / name, dtype=self.dtype, overwrite=True,
                                          progress=self.progress)
        weights = f"{name}.weights.safetensors"
        save_file({k: v.to("cpu").contiguous() for k, v in _trainable(self.attributor.module).items()},
                  self.out / weights)
        self.captured = [c for c in self.captured if c.step != step] + [
            Checkpoint(step, float(learning_rate), name, weights)]
        self.captured.sort(key=lambda c: c.step)
        tmp = self.out / f"{INDEX}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps([asdict(c) for c in self.captured], indent=1) + "\n")
        os.replace(tmp, self.out / INDEX)
        return store


def trainer_callback(capture: CheckpointCapture) -> Any:
    """A ``transformers.TrainerCallback`` that calls ``capture.step(global_step, lr)`` after each optimizer step.

    The learning rate is the scheduler's current one (``get_last_lr()``), else the optimizer's.
    Use: ``Trainer(..., callbacks=[trainer_callback(capture)])``.
    """
    from transformers import TrainerCallback

    class AirtraceCapture(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
            if lr_scheduler is not None:
                learning_rate = float(lr_scheduler.get_last_lr()[0])
            else:
                learning_rate = float(optimizer.param_groups[0]["lr"])
            capture.step(state.global_step, learning_rate)

    return AirtraceCapture()


def score_checkpoints(attributor: Attributor, query_batches: Batches, out: str | os.PathLike, *, topk: int = 10,
                      metric: str = "inner", order: str = "top", progress: bool = True) -> Scores:
    """Learning-rate-weighted sum of the scores at every checkpoint captured into ``out`` (TracIn-CP).

    Args:
        attributor: an Attributor on the model (any weights; they are restored afterwards), with the
            layers and projection of the capture; its curvature method is fitted per checkpoint.
        query_batches: the queries.
        out: the capture folder.
        topk: results per query and order.
        metric: "inner" or "cosine" (of each checkpoint, before weighting).
        order: "top", "bottom" or "both".
        progress: show progress bars.

    Returns:
        :class:`Scores` of ``Σ_c η_c S_c``, with the (q, n) matrix, columns in the row order of the first
        checkpoint's store (a shuffled loader writes each checkpoint in another order: rows are matched by id).

    Raises:
        ValueError: no checkpoints, or checkpoints whose stores hold other examples.
    """
    check_order(order)
    if metric not in ("inner", "cosine"):
        raise ValueError(f"metric must be 'inner' or 'cosine' for checkpoint-weighted scores, got {metric!r}")
    found = checkpoints(out)
    if not found:
        raise ValueError(f"{out}: no checkpoints captured")
    model = attributor.module
    saved = {k: v.clone() for k, v in _trainable(model).items()}
    total, query_ids, train_ids = None, None, None
    try:
        for checkpoint in found:
            weights = load_file(Path(out) / checkpoint.weights)
            _load(model, weights)
            store = Store.open(Path(out) / checkpoint.store)
            if train_ids is None:
                train_ids, column = store.ids, {i: c for c, i in enumerate(store.ids)}
            elif sorted(map(str, store.ids)) != sorted(map(str, train_ids)):
                raise ValueError(f"{out}/{checkpoint.store}: holds other training examples than the first checkpoint")
            attributor.curvature = None
            if attributor.curvature_method != "identity":
                attributor.fit(store=store, progress=progress)
            scores = attributor.score(query_batches, store, topk=1, metric=metric, matrix=True, progress=progress)
            weighted = torch.zeros_like(scores.matrix, dtype=torch.float64)
            weighted[:, [column[i] for i in store.ids]] = checkpoint.learning_rate * scores.matrix.double()
            total = weighted if total is None else total + weighted
            query_ids = scores.query_ids
    finally:
        _load(model, saved)
    k = min(topk, total.shape[1])
    signed = total if order == "top" else -total if order == "bottom" else torch.cat([total, -total])
    values, indices = signed.topk(k, dim=1)
    top_v, top_i, bottom_v, bottom_i = split_signed(values, indices, total.shape[0], order)
    names = lambda rows: [[train_ids[i] for i in row] for row in rows.tolist()]  # noqa: E731
    return Scores(top_v, top_i, None if top_i is None else names(top_i), query_ids, metric,
                  bottom_values=bottom_v, bottom_indices=bottom_i, bottom_ids=None if bottom_i is None else names(bottom_i),
                  matrix=total)


def _load(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` (parameter name -> tensor) into the model's parameters."""
    params = dict(model.named_parameters())
    missing = [name for name in weights if name not in params]
    if missing:
        raise ValueError(f"checkpoint weights name parameters the model does not have: {missing[:3]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
