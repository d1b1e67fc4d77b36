"""High-level attribution API: featurize -> fit -> score.

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
  one block (k_out, k_in) per layer; with ``exact_small=True`` a layer side
  whose width d is at most its k is kept exact (block side d, identity
  projection), so small layers carry their unprojected gradient;
- dense (TRAK, ``projection=dict(type="dense", k=1024, seed=0, kind="rademacher")``):
  the flattened per-example gradients of all layers times an implicit random
  (p, k) matrix, one block named "dense" of shape (1, k). Small models only;
  curvature identity, fisher or lowrank.

Precision: features are float32 (float64 for float64 models) until the store
casts them to its dtype; curvature sums accumulate in float64 over per-batch
products in the features' precision, and the factors are decomposed and
inverted in float64; scores accumulate in float32 (float64 for float64 models).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from airtrace import curvature as cv
from airtrace._checks import positive_int
from airtrace import distributed, ops
from airtrace.capture import GradientCapture, LayerSpec, make_projections, select_layers
from airtrace.curvature import Curvature
from airtrace.profiling import stage, timed_iter
from airtrace.ref.hash import KINDS, dense_entries
from airtrace.ref.project import accumulation_dtype
from airtrace.scoring import (
    FullMatrixWriter,
    GroupScores,
    Scores,
    SelfInfluence,
    check_metric,
    progress_bar,
    self_influence_key,
    store_self_influence,
    stream_scores,
)
from airtrace.store import (
    Store,
    StoreCompleteError,
    StoreError,
    StoreWriter,
    default_rows_per_shard,
    dtype_name,
    model_fingerprint,
    normalize_ids,
)

log = logging.getLogger("airtrace")

CURVATURES = ("ekfac", "kfac", "fisher", "lowrank", "identity")
FACTORED = {"type": "factored", "k_in": 16, "k_out": 16, "seed": 0, "exact_small": False}
DENSE = {"type": "dense", "k": 1024, "seed": 0, "kind": "rademacher"}
DENSE_BLOCK = "dense"
DENSE_MATRIX_MAX_ENTRIES = 2**23
"""Largest p·k for which the dense projection keeps its matrix (32 MiB in float32) instead of
regenerating it per batch."""
MAX_SEED = 2**32

LossFn = Callable[[nn.Module, Any], torch.Tensor]
Batches = Iterable[tuple[Sequence, Any]]


# --------------------------------------------------------------------------- configuration


def projection_config(projection: Mapping | str | None) -> dict:
    """Normalise a projection spec to a full config dict.

    Args:
        projection: None or "factored" (k_in = k_out = 16, seed 0); "dense"
            (k = 1024, seed 0, rademacher); or a dict with ``type`` ("factored" or
            "dense"; default "dense" when it has ``k``, else "factored") and any of
            ``k_in, k_out, seed, exact_small`` (factored; ``exact_small=True`` keeps a layer
            side no wider than its k unprojected, see :func:`airtrace.capture.make_projections`)
            or ``k, seed, kind`` (dense).

    Returns:
        ``{"type": "factored", "k_in", "k_out", "seed", "exact_small"}`` or
        ``{"type": "dense", "k", "seed", "kind"}``.

    Raises:
        ValueError: unknown type or key, or a non-positive dimension / bad seed / kind.
    """
    if projection is None or isinstance(projection, str):
        projection = {"type": projection or "factored"}
    if not isinstance(projection, Mapping):
        raise ValueError(f"projection must be a dict, 'factored' or 'dense', got {projection!r}")
    kind = projection.get("type", "dense" if "k" in projection else "factored")
    if kind not in ("factored", "dense"):
        raise ValueError(f"projection type must be 'factored' or 'dense', got {kind!r}")
    defaults = FACTORED if kind == "factored" else DENSE
    unknown = sorted(set(projection) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {kind} projection keys {unknown}; allowed: {sorted(defaults)}")
    config = {**defaults, **projection, "type": kind}
    for key in ("k_in", "k_out") if kind == "factored" else ("k",):
        positive_int(f"projection {key}", config[key])
    if isinstance(config["seed"], bool) or not isinstance(config["seed"], int) or not 0 <= config["seed"] < MAX_SEED:
        raise ValueError(f"projection seed must be an int in [0, 2^32), got {config['seed']!r}")
    if kind == "factored" and not isinstance(config["exact_small"], bool):
        raise ValueError(f"projection exact_small must be a bool, got {config['exact_small']!r}")
    if kind == "dense" and config["kind"] not in KINDS:
        raise ValueError(f"dense projection kind must be one of {KINDS}, got {config['kind']!r}")
    return config


def _layer_specs(model: nn.Module, layers, exclude, bias: bool) -> list[LayerSpec]:
    """LayerSpecs as given, or selected by name patterns."""
    if isinstance(layers, Sequence) and not isinstance(layers, str) and layers and all(
            isinstance(spec, LayerSpec) for spec in layers):
        return list(layers)
    return select_layers(model, layers, exclude, bias=bias)


def _essential(record: Mapping) -> dict:
    """The parts of a projection record that decide the features (not provenance)."""
    keys = ("type", "k_in", "k_out", "seed", "exact_small", "k", "kind", "layers")
    essential = {key: record[key] for key in keys if key in record}
    if essential.get("type") == "factored":
        essential.setdefault("exact_small", False)  # records written before the option existed
    return essential


# --------------------------------------------------------------------------- K-FAC sums of a featurize pass


def kfac_sidecar(store: Store) -> str:
    """Path of the store's K-FAC sidecar: the factor sums a featurize that wrote all of ``store`` accumulated,
    named by :meth:`airtrace.store.Store.content_key` (so it never applies to other features)."""
    return store.sidecar_path(f"kfac-sums-{store.content_key()}")


def _save_kfac_sums(store: Store, fitter: cv.KFACFitter) -> None:
    """Keep the sums beside the store, so that a later fit (another process, the CLI) skips the K-FAC pass."""
    try:
        fitter.save_state(kfac_sidecar(store))
    except OSError as exc:
        log.warning("airtrace: could not save the K-FAC sums in %s (%s); fit will run its own K-FAC pass",
                    store.path, exc)


def _load_kfac_sums(store: Store, damping, *, float32_products: bool) -> cv.KFACFitter | None:
    """The sums of the store's K-FAC sidecar as a fitter (``float32_products``: they were summed from
    float32 products, i.e. the model is not float64); None when there is none (a bad one is ignored)."""
    path = kfac_sidecar(store)
    if not os.path.exists(path):
        return None
    fitter = cv.KFACFitter(damping)
    fitter.float32_products = float32_products
    try:
        fitter.load_states([cv.KFACFitter.read_state(path)])
    except ValueError as exc:
        log.warning("airtrace: ignoring %s", exc)
        return None
    return fitter


# --------------------------------------------------------------------------- batches


def _pairs(batches: Batches, what: str) -> Iterator[tuple[list, Any]]:
    """Yield (ids as a list, batch) from an iterable of (ids, batch) pairs."""
    if batches is None:
        raise ValueError(f"{what} is None; pass an iterable of (ids, batch) pairs")
    for item in batches:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"{what} must yield (ids, batch) pairs, got {type(item).__name__}")
        ids, batch = item
        yield normalize_ids(ids, len(ids)), batch


def _reiterable(batches: Batches, what: str) -> Batches:
    if iter(batches) is batches:
        raise ValueError(
            f"{what} is a one-shot iterator but two passes are needed (K-FAC factors, then EK-FAC eigenvalues); "
            "pass a list or another re-iterable, or store=... for the second pass"
        )
    return batches


def _to_device(obj: Any, device: torch.device) -> Any:
    """Tensors (also inside mappings, lists and tuples) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {key: _to_device(value, device) for key, value in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_to_device(value, device) for value in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(value, device) for value in obj)
    return obj


def _attention_mask(batch: Any) -> torch.Tensor | None:
    return batch.get("attention_mask") if isinstance(batch, Mapping) else None


def _checked_rows(features: torch.Tensor, ids: list) -> torch.Tensor:
    if features.shape[0] != len(ids):
        raise ValueError(f"a batch has {len(ids)} ids but loss_fn returned {features.shape[0]} losses")
    return features


# --------------------------------------------------------------------------- the attributor


class Attributor:
    """Gradient-based attribution of queries to training examples, end to end.

    Args:
        model: the model; moved to ``device``, put in eval mode during every pass.
        layers: fnmatch pattern(s) of tracked layers (nn.Linear, Conv1D, nn.Conv2d,
            nn.Embedding), see :func:`airtrace.capture.select_layers`; or LayerSpecs.
        loss_fn: ``loss_fn(model, batch) -> (B,)`` per-example losses (see the module docstring).
        exclude: pattern(s) removed from ``layers``, e.g. ``"lm_head"``.
        bias: also attribute through the biases of the tracked layers.
        projection: see :func:`projection_config`; default factored 16 x 16, seed 0.
        curvature: "ekfac", "kfac", "fisher", "lowrank" or "identity".
        damping: :class:`airtrace.curvature.Damping`, a number (absolute λ) or None
            (0.1 × the layer's mean eigenvalue).
        rank: eigenpairs kept per layer by "lowrank".
        device: where the model, batches and store shards go.
        backend: kernel backend for projection and scoring ("auto", "torch", "cpu", "cuda", "triton").

    Attributes:
        layers: the tracked LayerSpecs, in layout order.
        projection: the normalised projection config.
        curvature_method: the curvature method ``fit`` uses.
        curvature: the fitted :class:`Curvature` (None until ``fit`` / ``load_curvature``).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str] | Sequence[LayerSpec] = ("*",),
        *,
        loss_fn: LossFn,
        exclude: str | Sequence[str] = (),
        bias: bool = False,
        projection: Mapping | str | None = None,
        curvature: str = "ekfac",
        damping: cv.Damping | float | None = None,
        rank: int = 32,
        device: str | torch.device = "cpu",
        backend: str = "auto",
    ):
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable as loss_fn(model, batch) -> (B,) losses, got {loss_fn!r}")
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        self.projection = projection_config(projection)
        if self.projection["type"] == "dense" and curvature in ("kfac", "ekfac"):
            raise ValueError(f"curvature {curvature!r} needs the factored projection (Kronecker factors per layer); "
                             "use curvature='identity', 'fisher' or 'lowrank' with a dense projection")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.loss_fn, self.backend = loss_fn, backend
        self.curvature_method, self.damping, self.rank = curvature, damping, rank
        self.layers = _layer_specs(model, layers, exclude, bias)
        self._dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self._projections = self._make_projections()
        self.curvature: Curvature | None = None
        self._featurized_kfac: tuple[str, cv.KFACFitter] | None = None  # (store path, factors) of featurize
        self._dense_r: torch.Tensor | None = None  # kept dense projection matrix (small models)

    @classmethod
    def from_store(cls, model: nn.Module, store: Store | str | os.PathLike, *, loss_fn: LossFn,
                   **kwargs: Any) -> Attributor:
        """An Attributor with the layers and projection a store was featurized with.

        Args:
            model: the model the store was written for.
            store: a :class:`Store` or its path.
            loss_fn: per-example loss function.
            **kwargs: other constructor arguments (curvature, damping, device, ...).

        Raises:
            StoreError: the store was not written by :meth:`featurize`.
        """
        store = store if isinstance(store, Store) else Store.open(store)
        record = store.meta.get("projection")
        if not isinstance(record, Mapping) or "layers" not in record or "type" not in record:
            raise StoreError(f"{store.path}: its manifest has no projection record; it was not written by "
                             "Attributor.featurize")
        defaults = FACTORED if record["type"] == "factored" else DENSE
        projection = {key: record.get(key, default) for key, default in defaults.items()}
        layers = [LayerSpec(**spec) for spec in record["layers"]]
        return cls(model, layers, loss_fn=loss_fn, projection=projection, **kwargs)

    # -- layout

    @property
    def dims(self) -> dict[str, tuple[int, int]]:
        """{block: (k_out, k_in)} per layer (factored), or {"dense": (1, k)}."""
        if self.projection["type"] == "dense":
            return {DENSE_BLOCK: (1, self.projection["k"])}
        return self._projections.dims()

    @property
    def width(self) -> int:
        """Feature columns per example."""
        return sum(math.prod(d) for d in self.dims.values())

    def _record(self) -> dict:
        """The projection record kept in the store manifest's meta."""
        layers = [asdict(spec) for spec in self.layers]
        if self._projections is None:
            return {**self.projection, "layers": layers}
        return {"type": "factored", **self._projections.config()}

    def _make_projections(self):
        if self.projection["type"] == "dense":
            return None
        dtype = torch.float64 if self._dtype == torch.float64 else torch.float32
        p = self.projection
        return make_projections(self.layers, p["k_in"], p["k_out"], p["seed"], exact_small=p["exact_small"],
                                dtype=dtype, device=self.device)

    def _split(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, width) -> {block: (B, k_out, k_in)}."""
        dims = self.dims
        parts = torch.split(features, [math.prod(d) for d in dims.values()], dim=1)
        return {name: part.reshape(-1, *d) for (name, d), part in zip(dims.items(), parts)}

    # -- capture

    @contextlib.contextmanager
    def _capture(self, keep_tokens: bool = False) -> Iterator[GradientCapture]:
        was_training = self.model.training
        self.model.eval()
        try:
            with GradientCapture(self.model, self.layers, self._projections, backend=self.backend,
                                 keep_tokens=keep_tokens) as cap:
                yield cap
        finally:
            self.model.train(was_training)

    def _backward(self, batch: Any, cap: GradientCapture) -> int:
        """One forward/backward of a batch under the capture; returns B."""
        batch = _to_device(batch, self.device)
        cap.set_mask(_attention_mask(batch))
        with stage("capture"):
            losses = self.loss_fn(self.model, batch)
            if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
                shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
                raise ValueError(f"loss_fn must return (B,) per-example losses, got {shape}")
            outputs = cap.take_outputs()
            if outputs:  # none: collect() names the layers that were never called
                torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
        return losses.shape[0]

    def _assemble(self, blocks: dict[str, torch.Tensor]) -> torch.Tensor:
        """Captured per-layer blocks -> (B, width) features."""
        if self._projections is not None:
            return torch.cat(list(blocks.values()), dim=1)
        p = self.projection
        flat = list(blocks.values())
        with stage("project"):
            matrix = self._dense_matrix(sum(block.shape[1] for block in flat), flat[0])
            if matrix is not None:
                return torch.cat(flat, dim=1).to(matrix.dtype) @ matrix
            backend = "torch" if self.backend == "auto" and flat[0].dtype == torch.float64 else self.backend
            return ops.project_dense(flat, p["k"], p["seed"], p["kind"], backend=backend)

    def _dense_matrix(self, p: int, like: torch.Tensor) -> torch.Tensor | None:
        """The dense projection's (p, k) matrix R (the entries of :func:`airtrace.ops.project_dense`),
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

    def features(self, batch: Any) -> torch.Tensor:
        """Projected per-example gradients of one batch, not preconditioned.

        Returns:
            (B, width) float32 (float64 for float64 models) on ``device``, layout order.
        """
        return self._features(batch)

    def _features(self, batch: Any, kfac: cv.KFACFitter | None = None) -> torch.Tensor:
        """:meth:`features`; also adds the batch's projected tokens to ``kfac`` when given (same pass)."""
        with self._capture(keep_tokens=kfac is not None) as cap:
            self._backward(batch, cap)
            features = self._assemble(cap.collect())
            if kfac is not None:
                with stage("fit_update"):
                    kfac.update(*cap.collect_tokens())
            return features

    # -- featurize

    def featurize(self, batches: Batches, path: str | os.PathLike, *, dtype: str | torch.dtype = "bfloat16",
                  rows_per_shard: int | None = None, total: int | None = None, overwrite: bool = False,
                  progress: bool = True) -> Store:
        """Write per-example features of ``batches`` to a store; resumes an interrupted run.

        Batches whose ids are all in the store already are skipped without a
        forward pass; the finished store is byte-identical to an uninterrupted run.
        Under an initialised process group (torchrun) the ranks split the
        batches and rank 0 merges their sub-stores into the same store
        (:func:`airtrace.distributed.featurize`).

        Args:
            batches: iterable of (ids, batch); ids unique across the dataset.
            path: store directory (new, empty, or an incomplete store from the same settings).
            dtype: stored dtype, "float32", "bfloat16" or "float16".
            rows_per_shard: rows per shard file; default 4096, fewer for wide rows so that a shard
                stays within 128 MiB (:func:`airtrace.store.default_rows_per_shard`).
            total: number of examples, for the progress bar's ETA.
            overwrite: replace an existing store at ``path``.
            progress: show a progress bar (examples/s, ETA).

        Returns:
            The finished :class:`Store`; its manifest meta records the projection
            (config, seeds, layers) and ``"curvature": None``.

        Raises:
            StoreMismatchError: resuming a store written with other settings or weights.
            StoreError: ``path`` is a finished store that lacks some of ``batches`` or has another dtype
                or rows_per_shard (a finished store that holds them all is returned as it is).
        """
        if rows_per_shard is None:
            rows_per_shard = default_rows_per_shard(self.width, dtype)
        try:
            if distributed.active():
                return distributed.featurize(self, batches, path, dtype=dtype, rows_per_shard=rows_per_shard,
                                             total=total, overwrite=overwrite, progress=progress)
            return self._write_features(batches, path, dtype=dtype, rows_per_shard=rows_per_shard, total=total,
                                        overwrite=overwrite, progress=progress)
        except StoreCompleteError:
            return self._finished_store(path, batches, dtype, rows_per_shard)

    def _finished_store(self, path: str | os.PathLike, batches: Batches, dtype: str | torch.dtype,
                        rows_per_shard: int) -> Store:
        """A finished store at ``path`` that already holds every example of ``batches`` with these settings.

        Makes a repeated featurize (a retry loop, a rerun script) a no-op; reads
        the batches' ids only, no forward pass.

        Raises:
            StoreError: other settings, or an example of ``batches`` missing from the store.
        """
        store = self._checked_store(path)
        if (store.manifest["dtype"], store.rows_per_shard) != (dtype_name(dtype), rows_per_shard):
            raise StoreError(f"{store.path}: the finished store has dtype {store.manifest['dtype']} and rows_per_shard "
                             f"{store.rows_per_shard}, featurize asked for {dtype_name(dtype)} and {rows_per_shard}. "
                             "Fix: pass the store's settings, or overwrite=True to write it again.")
        stored = set(store.ids)
        for ids, _ in _pairs(batches, "batches"):
            missing = [i for i in ids if i not in stored]
            if missing:
                raise StoreError(f"{store.path}: the store is finished but lacks example id {missing[0]!r} of "
                                 "batches. Fix: write to a new directory, or pass overwrite=True to write it again.")
        return store

    def _write_features(self, batches: Batches, path: str | os.PathLike, *, dtype: str | torch.dtype,
                        rows_per_shard: int, total: int | None, overwrite: bool, progress: bool) -> Store:
        """The featurize loop of one process: features of ``batches`` appended to the store at ``path``;
        returns the finished store."""
        writer = StoreWriter(path, model_fingerprint(self.model), list(self.dims.items()), dtype, rows_per_shard,
                             {"projection": self._record(), "curvature": None}, overwrite=overwrite)
        done = set(writer.done_ids)
        kfac = self._kfac_alongside() if not done else None
        self._featurized_kfac = None
        with writer, progress_bar(total, "featurize", progress, initial=writer.rows_done) as bar:
            for ids, batch in _pairs(batches, "batches"):
                keep = [j for j, i in enumerate(ids) if i not in done]
                if len(keep) < len(ids):
                    kfac = None  # resumed: the factors would miss the rows written before
                if keep:
                    features = _checked_rows(self._features(batch, kfac), ids)
                    with stage("store_write"):
                        writer.append(features[keep], [ids[j] for j in keep])
                    bar.update(len(keep))
        store = Store.open(path)
        if kfac is not None:
            self._featurized_kfac = (os.path.abspath(writer.path), kfac)
            _save_kfac_sums(store, kfac)
        return store

    def _kfac_alongside(self) -> cv.KFACFitter | None:
        """A K-FAC fitter for featurize to fill from the same forward/backward passes, when fit will need one."""
        wanted = self.curvature_method in ("kfac", "ekfac") and self._projections is not None
        return cv.KFACFitter(self.damping) if wanted and not distributed.active() else None

    # -- fit

    def fit(self, batches: Batches | None = None, path: str | os.PathLike | None = None, *,
            store: Store | str | os.PathLike | None = None, total: int | None = None,
            progress: bool = True) -> Curvature:
        """Fit the curvature (and keep it as ``self.curvature``).

        Passes: "identity" none; "fisher" / "lowrank" one over per-example
        features (from ``store`` when given, else ``batches``); "kfac" one over
        ``batches`` (token-level projected a, g -> Kronecker factors); "ekfac" the
        K-FAC pass, then the eigenvalue correction over per-example features
        (from ``store`` when given, else a second pass over ``batches``). The
        K-FAC pass is skipped when a featurize with curvature "kfac" or "ekfac"
        wrote all of ``store`` (not resumed, one process): it accumulated the
        same factors from its own forward/backward passes and kept their sums in
        the store's K-FAC sidecar (:func:`kfac_sidecar`), which any later fit of
        that store uses (the damping is applied here). Under
        an initialised process group the ranks split the batches and the store's
        shards, the fitters' sums are added over ranks, every rank gets the same
        curvature and rank 0 saves it.

        Args:
            batches: iterable of (ids, batch) training batches (ids are not used).
            path: save the factors here (safetensors) when given.
            store: training features written by :meth:`featurize` of this model.
            total: examples in ``batches``, for the progress bars' ETA (default: the store's rows).
            progress: show progress bars.

        Returns:
            The fitted :class:`Curvature` (damping per layer in ``.damping``).
        """
        store = None if store is None else self._checked_store(store)
        if store is not None and len(store) == 0:
            raise StoreError(f"{store.path}: the store holds no rows (was the training set empty?); "
                             "nothing to fit the curvature on")
        total = len(store) if total is None and store is not None else total
        method = self.curvature_method
        if method == "identity":
            curvature = cv.identity(self.dims)
        elif method in ("fisher", "lowrank"):
            fitter = cv.FisherFitter(self.damping) if method == "fisher" else cv.LowRankFitter(self.rank, self.damping)
            curvature = self._fit_features(fitter, batches, store, total, progress)
        else:
            if method == "ekfac" and store is None:
                _reiterable(batches, "batches")
            curvature = self._featurized_kfac_of(store) or self._fit_kfac(batches, total, progress)
            if method == "ekfac":
                fitter = cv.EKFACFitter(curvature, self.damping)
                curvature = self._fit_features(fitter, batches, store, total, progress)
        if path is not None:
            with distributed.all_or_none("saving the curvature"):
                if distributed.is_main():
                    curvature.save(path)
        self.curvature = curvature
        return curvature

    def _featurized_kfac_of(self, store: Store | None) -> Curvature | None:
        """The K-FAC factors :meth:`featurize` accumulated while writing ``store`` in full, if it did
        (kept in memory by this Attributor, or in the store's K-FAC sidecar by any)."""
        if store is None:
            return None
        if self._featurized_kfac is not None:
            path, fitter = self._featurized_kfac
            if path == os.path.abspath(store.path) and fitter.n_examples == len(store):
                return fitter.finalize()
        fitter = _load_kfac_sums(store, self.damping, float32_products=self._dtype != torch.float64)
        if fitter is None or fitter.n_examples != len(store) or fitter.dims != self.dims:
            return None
        return fitter.finalize()

    def _fit_kfac(self, batches: Batches, total: int | None, progress: bool) -> Curvature:
        fitter = cv.KFACFitter(self.damping)
        fitter.float32_products = self._dtype != torch.float64  # also on a rank that gets no batch
        with self._capture(keep_tokens=True) as cap, progress_bar(
                distributed.share(total), "fit: K-FAC factors", progress and distributed.is_main()) as bar:
            for _, batch in _pairs(distributed.rank_batches(batches), "batches"):
                n = self._backward(batch, cap)
                cap.collect()
                with stage("fit_update"):
                    fitter.update(*cap.collect_tokens())
                bar.update(n)
        distributed.reduce_fitter(fitter)
        return fitter.finalize()

    def _fit_features(self, fitter, batches: Batches | None, store: Store | None, total: int | None,
                      progress: bool) -> Curvature:
        """Feed per-example features (store shards, else batches; this rank's part) to a fitter; finalize it."""
        with progress_bar(distributed.share(total), f"fit: {self.curvature_method}",
                          progress and distributed.is_main()) as bar:
            if store is not None:
                for chunk in timed_iter(distributed.rank_shards(store).iter_shards(self.device)):
                    with stage("fit_update"):
                        fitter.update(self._split(chunk.features))
                    bar.update(chunk.features.shape[0])
            else:
                for ids, batch in _pairs(distributed.rank_batches(batches), "batches"):
                    features = _checked_rows(self.features(batch), ids)
                    with stage("fit_update"):
                        fitter.update(self._split(features))
                    bar.update(len(ids))
        distributed.reduce_fitter(fitter)
        return fitter.finalize()

    def load_curvature(self, path: str | os.PathLike) -> Curvature:
        """Use the curvature saved by ``fit(..., path)``; its method replaces ``curvature``.

        Raises:
            ValueError: unreadable file, or layers / dims that differ from this Attributor's.
        """
        curvature = Curvature.load(path)
        if curvature.dims != self.dims:
            raise ValueError(f"{os.fspath(path)}: the curvature covers {curvature.dims}, this Attributor's "
                             f"features are {self.dims}; fit it on this store's layers and projection")
        self.curvature, self.curvature_method = curvature, curvature.method
        return curvature

    def _fitted(self) -> Curvature:
        if self.curvature is None:
            if self.curvature_method != "identity":
                raise ValueError(f"no {self.curvature_method!r} curvature yet: call fit(...) or "
                                 "load_curvature(path) before scoring")
            self.curvature = cv.identity(self.dims)
        return self.curvature

    def _precondition(self, features: torch.Tensor, exact: bool = True) -> torch.Tensor:
        """H⁻¹ applied to (rows, width) features, block by block -> (rows, width); see Curvature.precondition."""
        with stage("precondition"):
            pre = self._fitted().precondition(self._split(features), exact=exact)
            return torch.cat([pre[name].reshape(features.shape[0], -1) for name in self.dims], dim=1)

    def _precondition_rows(self, features: torch.Tensor) -> torch.Tensor:
        """H⁻¹ on store rows for self-influence: float32 through the fused kernels (float64 stays exact)."""
        return self._precondition(features, exact=False)

    # -- score

    def _checked_store(self, store: Store | str | os.PathLike) -> Store:
        """Open a store and check it holds this model's features with this layout and projection."""
        store = store if isinstance(store, Store) else Store.open(store)
        store.check_fingerprint(model_fingerprint(self.model))
        ours, theirs = _essential(self._record()), _essential(store.meta.get("projection") or {})
        if ours != theirs or [(b.name, b.shape) for b in store.layout] != list(self.dims.items()):
            raise StoreError(f"{store.path}: the store was featurized with projection {theirs}, this Attributor "
                             f"uses {ours}. Fix: Attributor.from_store(model, store, ...) or featurize again")
        return store

    def self_influence(self, store: Store | str | os.PathLike, *, progress: bool = True) -> torch.Tensor:
        """``ĝ_xᵀ H⁻¹ ĝ_x`` of every training example (n,) float64, cached in a store sidecar."""
        store = self._checked_store(store)
        key = self_influence_key(store, self._fitted())
        dtype = torch.float64 if self._dtype == torch.float64 else torch.float32
        return store_self_influence(store, key, self._precondition_rows, device=self.device, dtype=dtype,
                                    progress=progress)

    def _queries(self, query_batches: Batches) -> tuple[list, torch.Tensor]:
        """Query ids and their preconditioned features (q, width)."""
        ids, rows = [], []
        for qids, batch in _pairs(query_batches, "query_batches"):
            rows.append(self._precondition(_checked_rows(self.features(batch), qids)))
            ids.extend(qids)
        if not rows:
            raise ValueError("query_batches yielded no examples")
        return ids, torch.cat(rows)

    def score(self, query_batches: Batches, store: Store | str | os.PathLike, *, topk: int = 10,
              metric: str = "inner", full_matrix_path: str | os.PathLike | None = None,
              groups: Sequence[Sequence[int]] | None = None, progress: bool = True) -> Scores:
        """Score queries against every training example of a store, streamed shard by shard.

        Query features go through the same capture and projection as the store,
        then the fitted curvature: ``q̃ = H⁻¹ ĝ_q``. See :mod:`airtrace.scoring`
        for the metrics. Memory is bounded by a shard, not by n × q. Under an
        initialised process group every rank scores a contiguous block of the
        shards and the per-rank top-k (global indices) and group sums are
        combined on every rank (:mod:`airtrace.distributed`).

        Args:
            query_batches: iterable of (ids, batch) queries.
            store: training features of this model (:meth:`featurize`).
            topk: results per query.
            metric: "inner", "cosine" or "relative".
            full_matrix_path: also write the (q, n) score matrix (tensor "scores",
                float32 / float64) to this safetensors file (single process only).
            groups: G lists of train row indices; adds (q, G) group sums of the scores.
            progress: show progress bars.

        Returns:
            :class:`Scores` with values / indices (q, topk), train ids, query ids and
            group scores (q, G) when ``groups`` is given, on the CPU.

        Raises:
            StoreError: the store belongs to another model (fingerprint) or projection.
            ValueError: ``full_matrix_path`` under a process group of several ranks.
        """
        check_metric(metric)
        if full_matrix_path is not None and distributed.active():
            raise ValueError("full_matrix_path is not supported in a distributed run (each rank scores only its "
                             "shards); score with one process to write the full matrix")
        store = self._checked_store(store)
        curvature = self._fitted()
        query_ids, Q = self._queries(query_batches)
        n, q = len(store), Q.shape[0]
        sums = None if groups is None else GroupScores(groups, n, q, Q.dtype, self.device)
        influence = None
        if metric == "relative":
            influence = SelfInfluence(store, self_influence_key(store, curvature), self._precondition_rows)
        full = None
        if full_matrix_path is not None:
            meta = {"metric": metric, "store": os.path.abspath(store.path), "fingerprint": store.fingerprint,
                    "query_ids": query_ids, "curvature": curvature.method}
            full = FullMatrixWriter(full_matrix_path, q, n, Q.dtype, meta)
        try:
            values, indices = stream_scores(Q, distributed.rank_shards(store), topk=topk, metric=metric,
                                            self_influence=influence, groups=sums, full_matrix=full,
                                            backend=self.backend, progress=progress and distributed.is_main())
        except BaseException:
            if full is not None:
                full.abort()
            raise
        if full is not None:
            full.close()
        values, indices = distributed.merge_topk(values, indices, topk)
        if sums is not None:
            distributed.all_reduce_sum(sums.values)
        train_ids = store.ids
        ids = [[train_ids[i] if i >= 0 else None for i in row] for row in indices.tolist()]
        return Scores(values.cpu(), indices.cpu(), ids, query_ids, metric, None if sums is None else sums.values.cpu())


# --------------------------------------------------------------------------- CLI tasks


@dataclass
class Task:
    """What a model factory returns for the CLI (``airtrace featurize|fit|score --model pkg.module:function``).

    The factory is called without arguments. It may return a Task, or a tuple
    ``(model, loss_fn, train, queries)``.

    Attributes:
        model: the model.
        loss_fn: ``loss_fn(model, batch) -> (B,)`` per-example losses.
        train: re-iterable of (ids, batch) training batches (``fit`` may pass over it twice).
        queries: iterable of (ids, batch) query batches, needed by ``score``.
        train_size: number of training examples, for progress ETAs (None: unknown).
    """

    model: nn.Module
    loss_fn: LossFn
    train: Batches
    queries: Batches | None = None
    train_size: int | None = None


def load_task(spec: str) -> Task:
    """Import ``package.module:function`` (the current directory is searched last) and call it.

    Raises:
        ValueError: malformed spec, module or function not found, or a result that is
            neither a Task nor a (model, loss_fn, train, queries) tuple.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model must look like package.module:function, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # last, so an installed package is never shadowed by a folder here
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--model {spec!r}: cannot import {module_name!r} ({exc})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"--model {spec!r}: {module_name!r} has no callable {attr!r}")
    result = factory()
    if isinstance(result, tuple) and len(result) == 4:
        result = Task(*result)
    if not isinstance(result, Task):
        raise ValueError(f"--model {spec!r}: the factory must return an airtrace.Task or a tuple "
                         f"(model, loss_fn, train, queries), got {type(result).__name__}")
    return result
