"""Datamodel labels for AirRep: losses of dev and query examples under models retrained on random subsets; imports
``airtrace.eval`` (retraining, the LM task), ``airtrace.data`` and ``airtrace.util``.

The target model is the chatterbot causal LM of :mod:`airtrace.eval.tasks.lm`,
trained from scratch on subsets of its training pool by the resumable
:func:`airtrace.eval.retrain` driver. Every subset model is measured on two
disjoint sets of pairs that are both outside the pool:

- *dev* pairs (the corpus pairs that are neither pool nor query): their labels
  train the encoder;
- the task's *query* pairs: never used for training the encoder, they are the
  held-out examples of the evaluation.

Outputs are minus the mean answer-token loss (higher = fit better); the labels
of :func:`airtrace.airrep.objective.normalize_labels` take the loss ``ℓ = −output``.

Runs are cached under ``$AIRTRACE_CACHE/airrep/<config hash>/`` (default
``~/.cache/airtrace``): the subset plan, one file per finished subset model, and
``ground_truth.safetensors``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from airtrace import data
from airtrace.data import Pair
from airtrace.eval import retrain, sample_subsets
from airtrace.eval.tasks.lm import SIZES, LMTask, lm_config
from airtrace.util.cache import cache_root, config_hash


@dataclass(frozen=True)
class LabelConfig:
    """What decides a label run.

    ``n_subsets`` defaults to 512: encoder quality still grows with the subset
    models it is trained on (validation LDS of the tiny LM's projector-only
    AirRep: 0.20 / 0.30 / 0.32 with 36 / 72 / 144 training subsets on a split
    of the first 256; 0.23 / 0.24 / 0.26 with 72 / 144 / 288 on a split of the
    first 384), and a tiny-LM subset model costs about 1 s on one core (larger
    sizes cost more).

    Attributes:
        size: LM task size preset ("tiny", "default", "large"; see :data:`airtrace.eval.tasks.lm.SIZES`).
        n_subsets: subset models trained (rows of the label matrix).
        fraction: share of the pool in each subset.
        seed: seed of the subset plan (it draws the members and every subset's training seed).
        n_dev: most dev pairs measured (None: every pair outside the pool and the queries).
    """

    size: str = "default"
    n_subsets: int = 512
    fraction: float = 0.5
    seed: int = 0
    n_dev: int | None = None

    def __post_init__(self):
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, got {self.size!r}")
        if isinstance(self.n_subsets, bool) or not isinstance(self.n_subsets, int) or self.n_subsets < 2:
            raise ValueError(f"n_subsets must be an int >= 2, got {self.n_subsets!r}")
        if not 0 < self.fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {self.fraction!r}")
        if self.n_dev is not None and (isinstance(self.n_dev, bool) or not isinstance(self.n_dev, int)
                                       or self.n_dev < 1):
            raise ValueError(f"n_dev must be a positive int or None, got {self.n_dev!r}")

    def record(self) -> dict:
        """The config and the LM task's full config, as JSON-able dict (hashed into the cache key)."""
        return {"labels": asdict(self), "lm": asdict(lm_config(self.size))}

    def directory(self) -> Path:
        """``cache_root("airrep") / <16 hex digits of the record's hash>``."""
        return cache_root("airrep") / config_hash(self.record())


@dataclass
class Labels:
    """Retrained outputs of dev and query pairs over subset models.

    Attributes:
        task: the LM task (pool = ``task.train``, queries = ``task.queries``).
        dev: dev pairs (columns ``[0, n_dev)`` of ``outputs``).
        masks: (m, n) bool subset membership over the pool.
        seeds: m training seeds.
        outputs: (m, n_dev + n_query) float64, minus the mean answer-token loss.
    """

    task: LMTask
    dev: list[Pair]
    masks: torch.Tensor
    seeds: list[int]
    outputs: torch.Tensor

    @property
    def dev_outputs(self) -> torch.Tensor:
        """(m, n_dev) outputs of the dev pairs."""
        return self.outputs[:, : len(self.dev)]

    @property
    def query_outputs(self) -> torch.Tensor:
        """(m, n_query) outputs of the task's query pairs."""
        return self.outputs[:, len(self.dev) :]


def dev_pairs(task: LMTask, n_dev: int | None = None) -> list[Pair]:
    """Distinct corpus pairs that are neither in the task's pool nor its queries, in corpus order (first ``n_dev``)."""
    taken = {(p["question"], p["answer"]) for p in (*task.train, *task.queries)}
    pairs = [p for p in data.unique(data.chatterbot_pairs()) if (p["question"], p["answer"]) not in taken]
    return pairs[:n_dev] if n_dev is not None else pairs


def generate(config: LabelConfig, *, progress: bool = True) -> Labels:
    """Train (or load from the cache) one LM per subset and measure the dev and query pairs.

    Resumable: finished subset models are kept in ``config.directory()``.

    Raises:
        ValueError: no dev pair is left outside the pool and the queries.
    """
    task = LMTask(lm_config(config.size))
    dev = dev_pairs(task, config.n_dev)
    if not dev:
        raise ValueError(f"LM size {config.size!r} uses the whole corpus: no dev pairs are left for labels")
    measured = dev + list(task.queries)
    plan = sample_subsets(len(task.train), config.n_subsets, fraction=config.fraction, seed=config.seed)

    def measure_fn(model) -> torch.Tensor:
        return -task.example_losses(model, measured)

    outputs = retrain(plan, task.train_fn, measure_fn, config.directory() / "runs", progress=progress,
                      config=config.record())
    return Labels(task, dev, plan.masks, plan.seeds, outputs)
