"""Per-example features of one model (``Featurizer``): the capture hooks, the factored or dense projection and the
feature layout; imports ``airtrace.capture``, ``airtrace.curvature``, the kernels layer and ``airtrace.profiling``."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from airtrace.attribute.batches import attention_mask, to_device
from airtrace.attribute.buckets import bucket_batch
from airtrace.attribute.config import LossFn
from airtrace.capture import GradientCapture, LayerSpec, make_projections, tracked_parameters
from airtrace.curvature import KFACFitter
from airtrace.ops.backends import accumulation_dtype
from airtrace.ops.hash import dense_entries
from airtrace.ops.project_dense import project_dense
from airtrace.ops.project_sparse import project_sparse
from airtrace.profiling import stage

AUTOCAST_DTYPES = {None: None, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""``autocast`` settings of the forward/backward: None runs in the model's own dtype (exact)."""

TokenSink = Callable[[list[int], Any, dict[str, list[tuple[torch.Tensor, torch.Tensor]]], torch.Tensor], None]
"""Receives the projected tokens of each model call of :meth:`Featurizer.features`: (rows, sub-batch, parts,
features)."""

DENSE_MATRIX_MAX_ENTRIES = 2**23
"""Largest p·k for which the dense projection keeps its matrix (32 MiB in float32) instead of
regenerating it per batch."""


class Featurizer:
    """Projected per-example gradients of a model's tracked layers, one batch at a time.

    Args:
        model: the model, already on ``device``; put in eval mode during every pass.
        layers: the tracked LayerSpecs, in layout order.
        loss_fn: ``loss_fn(model, batch) -> (B,)`` per-example losses.
        projection: a normalised projection config (:func:`airtrace.attribute.config.projection_config`).
        device: where batches go.
        backend: kernel backend of the projections.
        trim_padding: run a padded batch as length buckets (:mod:`airtrace.attribute.buckets`), so no
            forward or backward computes trailing padding; the rows come back in the batch's order.
        autocast: None (exact), or "bfloat16" / "float16": the loss_fn's forward runs under
            ``torch.autocast`` in that dtype (its backward follows it); the features still accumulate in float32.

    Attributes:
        projections: the factored projections (None for the dense and sparse projections).
    """

    def __init__(self, model: nn.Module, layers: list[LayerSpec], loss_fn: LossFn, projection: Mapping,
                 device: torch.device, backend: str, trim_padding: bool = True, autocast: str | None = None):
        if autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be one of {list(AUTOCAST_DTYPES)}, got {autocast!r}")
        self.model, self.layers, self.loss_fn = model, layers, loss_fn
        self.trim_padding, self.autocast = trim_padding, autocast
        self.projection, self.device, self.backend = projection, device, backend
        self.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self.projections = self._make_projections()
        self._tracked = tracked_parameters(model, layers)
        self._dense_r: torch.Tensor | None = None  # kept dense projection matrix (small models)

    @property
    def dims(self) -> dict[str, tuple[int, int]]:
        """{block: (k_out, k_in)} per layer (factored), or {"dense": (1, k)} / {"sparse": (1, k)}."""
        if self.projection["type"] != "factored":
            return {self.projection["type"]: (1, self.projection["k"])}
        return self.projections.dims()

    @property
    def width(self) -> int:
        """Feature columns per example."""
        return sum(math.prod(d) for d in self.dims.values())

    def record(self) -> dict:
        """The projection record kept in the store manifest's meta."""
        layers = [asdict(spec) for spec in self.layers]
        if self.projections is None:
            return {**self.projection, "layers": layers}
        return {"type": "factored", **self.projections.config()}

    def _make_projections(self):
        if self.projection["type"] != "factored":
            return None
        p = self.projection
        return make_projections(self.layers, p["k_in"], p["k_out"], p["seed"], exact_small=p["exact_small"],
                                exact_budget=p["exact_budget"],
                                dtype=accumulation_dtype(self.dtype), device=self.device)

    def split(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, width) -> {block: (B, k_out, k_in)}."""
        dims = self.dims
        parts = torch.split(features, [math.prod(d) for d in dims.values()], dim=1)
        return {name: part.reshape(-1, *d) for (name, d), part in zip(dims.items(), parts)}

    @contextlib.contextmanager
    def capture(self, keep_tokens: bool = False) -> Iterator[GradientCapture]:
        """The gradient hooks on the tracked layers for the block, with the model in eval mode and only the
        tracked parameters requiring grad (both restored after): the forward records no graph below the first
        tracked layer and the backward stops there (the model's own ``.grad`` fields are never touched)."""
        was_training = self.model.training
        untracked = [p for p in self.model.parameters() if p.requires_grad and id(p) not in self._tracked]
        self.model.eval()
        for p in untracked:
            p.requires_grad_(False)
        try:
            with GradientCapture(self.model, self.layers, self.projections, backend=self.backend,
                                 keep_tokens=keep_tokens) as cap:
                yield cap
        finally:
            for p in untracked:
                p.requires_grad_(True)
            self.model.train(was_training)

    def backward(self, batch: Any, cap: GradientCapture, loss_fn: LossFn | None = None) -> int:
        """One forward/backward of a batch under the capture (``loss_fn`` default: the training loss); returns B."""
        batch = to_device(batch, self.device)
        cap.set_mask(attention_mask(batch))
        with stage("capture") as timed:
            dtype = AUTOCAST_DTYPES[self.autocast]
            with torch.autocast(self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                losses = (loss_fn or self.loss_fn)(self.model, batch)
            if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
                shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
                raise ValueError(f"loss_fn must return (B,) per-example losses, got {shape}")
            outputs = cap.take_outputs()
            if outputs:  # none: collect() names the layers that were never called
                torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
            timed.add(losses.shape[0])
        return losses.shape[0]

    def assemble(self, blocks: dict[str, torch.Tensor]) -> torch.Tensor:
        """Captured per-layer blocks -> (B, width) features."""
        if self.projections is not None:
            return torch.cat(list(blocks.values()), dim=1)
        p = self.projection
        flat = list(blocks.values())
        with stage("project", rows=flat[0].shape[0]):
            if p["type"] == "sparse":
                return project_sparse(flat, p["k"], p["s"], p["seed"], backend=self.backend)
            matrix = self._dense_matrix(sum(block.shape[1] for block in flat), flat[0])
            if matrix is not None:
                return torch.cat(flat, dim=1).to(matrix.dtype) @ matrix
            return project_dense(flat, p["k"], p["seed"], p["kind"], backend=self.backend)

    def _dense_matrix(self, p: int, like: torch.Tensor) -> torch.Tensor | None:
        """The dense projection's (p, k) matrix R (the entries of the ``project_dense`` op),
        generated once and kept when p·k <= DENSE_MATRIX_MAX_ENTRIES: for a small model one product
        with a kept R is cheaper than regenerating R on the fly for every batch. None otherwise."""
        k = self.projection["k"]
        if p * k > DENSE_MATRIX_MAX_ENTRIES:
            return None
        dtype = accumulation_dtype(like.dtype)
        cached = self._dense_r
        if cached is None or cached.shape[0] != p or cached.dtype != dtype or cached.device != like.device:
            entries = dense_entries(torch.arange(p), k, self.projection["seed"], self.projection["kind"])
            self._dense_r = cached = entries.to(like.device, dtype)
        return cached

    def features(self, batch: Any, kfac: KFACFitter | None = None, loss_fn: LossFn | None = None,
                 tokens: TokenSink | None = None) -> torch.Tensor:
        """Projected per-example gradients of one batch, not preconditioned; also adds the batch's projected
        tokens to ``kfac`` and hands them to ``tokens`` when given (the same pass). A padded batch runs as
        length buckets (``trim_padding``).

        Args:
            batch: one batch, as ``loss_fn`` takes it.
            kfac: a K-FAC fitter to update from the same pass.
            loss_fn: per-example losses to differentiate (default: the training loss).
            tokens: called as ``tokens(rows, part, parts, features)`` once per model call: the row indices
                of ``batch`` it ran, that sub-batch (on ``device``), its projected tokens
                (``GradientCapture.token_parts``) and its (len(rows), width) features.

        Returns:
            (B, width) float32 (float64 for float64 models) on ``device``, layout order.
        """
        buckets = bucket_batch(batch) if self.trim_padding else None
        if buckets is None:
            return self._features(batch, kfac, loss_fn, tokens, None)
        out = None
        for rows, part in buckets:
            features = self._features(part, kfac, loss_fn, tokens, rows)
            if features.shape[0] != len(rows):
                raise ValueError(f"loss_fn returned {features.shape[0]} losses for a batch of {len(rows)} examples")
            if out is None:
                out = features.new_empty(sum(len(r) for r, _ in buckets), features.shape[1])
            out[torch.as_tensor(rows, device=out.device)] = features
        return out

    def _features(self, batch: Any, kfac: KFACFitter | None, loss_fn: LossFn | None, tokens: TokenSink | None,
                  rows: list[int] | None) -> torch.Tensor:
        """:meth:`features` of one batch as it is (``rows``: its rows in the caller's batch, None: all)."""
        with self.capture(keep_tokens=kfac is not None or tokens is not None) as cap:
            n = self.backward(batch, cap, loss_fn)
            features = self.assemble(cap.collect())
            if kfac is not None or tokens is not None:
                parts = cap.token_parts()
                if kfac is not None:
                    with stage("fit_update", rows=n):
                        kfac.update(*cap.concatenated(parts))
                if tokens is not None:
                    tokens(list(range(n)) if rows is None else rows, to_device(batch, self.device), parts, features)
            return features
