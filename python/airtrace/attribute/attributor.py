"""The ``Attributor``: featurize -> fit -> score of one model, end to end (see :mod:`airtrace.attribute`); imports the
pipeline (capture, store, curvature, scoring, ihvp), ``airtrace.distributed``, the kernels layer and ``airtrace.util``.

It is longer than the other modules (~650 lines) because it is one class whose three passes share the model, the
featurizer, the projection and the fitted curvature and are documented argument by argument; the parts that need no
shared state live beside it: the scoring passes in ``passes.py``, batch handling in ``batches.py``, per-token scores
in ``tokens.py``, rank splitting in ``ranks.py``."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from airtrace import curvature as cv
from airtrace import distributed
from airtrace.attribute.batches import (
    CONTENT,
    Batches,
    DeviceBatches,
    as_batches,
    check_same_data,
    checked_rows,
    content_digests,
    example_count,
    pairs,
    reiterable,
    stored_digests,
)
from airtrace.attribute.config import (
    CURVATURES,
    LossFn,
    check_dense_blocks,
    essential,
    exact_projection,
    layer_specs,
    projection_config,
    recorded_projection,
)
from airtrace.attribute.featurizer import Featurizer
from airtrace.attribute.kfac_sums import load_kfac_sums, save_kfac_sums
from airtrace.attribute.passes import exact_scores, two_stage_scores
from airtrace.attribute.ranks import featurize_ranks
from airtrace.attribute.tokens import KeptTokens, token_scores
from airtrace.capture import LayerSpec, unwrap
from airtrace.curvature import Curvature
from airtrace.curvature.damping import auto_factors, stationary_damping
from airtrace.curvature.fitting import as_damping
from airtrace.ihvp import CurvatureProducts, InverseHVP, SolverConfig
from airtrace.ihvp.products import ParameterLayout
from airtrace.ops.backends import accumulation_dtype
from airtrace.profiling import stage, timed_iter
from airtrace.scoring import (
    Scores,
    check_metric,
    check_order,
    self_influence_key,
    store_self_influence,
)
from airtrace.store import (
    Store,
    StoreCompleteError,
    StoreError,
    StoreWriter,
    default_rows_per_shard,
    dtype_name,
    model_fingerprint,
)
from airtrace.util.progress import progress_bar

log = logging.getLogger("airtrace")


# --------------------------------------------------------------------------- the attributor


class Attributor:
    """Gradient-based attribution of queries to training examples, end to end.

    Args:
        model: the model; moved to ``device``, put in eval mode during every pass. A
            ``torch.compile``'d model is the same model (same store, same layer names): the
            passes run its original module, which ``loss_fn`` receives.
        layers: fnmatch pattern(s) of tracked layers (nn.Linear, Conv1D, nn.Conv2d,
            nn.Embedding), see :func:`airtrace.capture.select_layers`; ``"lora"`` for a PEFT
            LoRA adapter's matrices; or LayerSpecs. Frozen layers are skipped, so ``"*"`` on a
            model with a frozen base and a LoRA adapter tracks the adapter only; tied weights
            are one layer.
        loss_fn: ``loss_fn(model, batch) -> (B,)`` per-example losses of training examples
            (see the module docstring).
        query_loss_fn: the same for queries (default ``loss_fn``), e.g. a token mean where
            training sums, or a measurement of a behaviour.
        exclude: pattern(s) removed from ``layers``, e.g. ``"lm_head"``.
        bias: also attribute through the biases of the tracked layers (default True).
        projection: see :func:`projection_config`; default factored 16 x 16, seed 0, layers with at most
            65536 gradient entries (4096 for the dense curvatures fisher and lowrank,
            :func:`airtrace.attribute.config.default_exact_budget`) and layer sides no wider than 16 kept exact; "exact" (the default with
            curvature "exact") keeps every layer unprojected (:func:`airtrace.attribute.config.exact_projection`).
        curvature: "ekfac", "kfac", "fisher", "lowrank", "identity" or "exact": ``(H + D)⁻¹`` of the training
            loss's Gauss-Newton matrix or Hessian over the tracked parameters, solved per query by ``solver``
            (:mod:`airtrace.ihvp`; needs unprojected features; ``fit`` fits EK-FAC as the solver's
            preconditioner and damping D, and keeps its training batches for the curvature products).
        damping: "auto" (default: a relative factor per layer chosen from the training features by
            :func:`airtrace.curvature.damping.auto_factors` when fitting, for curvature "exact" one λ by
            :func:`airtrace.curvature.damping.stationary_damping`; the rule and its criterion
            are kept in ``curvature.damping_rule``), :class:`airtrace.curvature.Damping`, a number
            (absolute λ) or None (the method's fixed factor × the layer's mean eigenvalue,
            :func:`airtrace.curvature.damping.default_factor`).
        rank: eigenpairs kept per layer by "lowrank".
        device: where the model, batches and store shards go.
        backend: kernel backend for projection and scoring ("auto", "torch", "cpu", "cuda", "triton").
        solver: curvature "exact" only: :class:`airtrace.ihvp.SolverConfig`, a dict of its fields or a method
            name ("cg" default, "lissa", "arnoldi", "dense").
        trim_padding: run a padded batch (a mapping with a (B, T) ``attention_mask``) as groups of rows of
            similar length, each cut to its longest row, so no forward or backward computes trailing padding
            (:mod:`airtrace.attribute.buckets`; rows keep their order and ids). Exact when padding changes
            neither the other tokens nor the loss (a model given the mask); False runs every batch as it is.
        autocast: None (default: exact, the model's own dtype), or "bfloat16" / "float16": every
            forward/backward of featurize, fit and score runs under ``torch.autocast`` in that dtype (faster
            on GPUs and on CPUs with bfloat16 dot products; SmolLM2's features are 2e-2 off, relative,
            see the README); a store records it, and resuming it needs the same setting.

    Attributes:
        layers: the tracked LayerSpecs, in layout order.
        projection: the normalised projection config.
        curvature_method: the curvature method ``fit`` uses.
        curvature: the fitted :class:`Curvature` (None until ``fit`` / ``load_curvature``; for "exact" the EK-FAC
            preconditioner).
        solver: the :class:`airtrace.ihvp.InverseHVP` of curvature "exact" after ``fit`` (None otherwise); its
            ``reports`` hold the convergence of every solve.
        featurizer: the :class:`airtrace.attribute.featurizer.Featurizer` that computes the features.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str] | Sequence[LayerSpec] = ("*",),
        *,
        loss_fn: LossFn,
        query_loss_fn: LossFn | None = None,
        exclude: str | Sequence[str] = (),
        bias: bool = True,
        projection: Mapping | str | None = None,
        curvature: str = "ekfac",
        damping: cv.Damping | float | str | None = "auto",
        rank: int = 32,
        device: str | torch.device = "cpu",
        backend: str = "auto",
        solver: SolverConfig | Mapping | str | None = None,
        trim_padding: bool = True,
        autocast: str | None = None,
    ):
        for name, fn in (("loss_fn", loss_fn), ("query_loss_fn", query_loss_fn or loss_fn)):
            if not callable(fn):
                raise ValueError(f"{name} must be callable as {name}(model, batch) -> (B,) losses, got {fn!r}")
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        self.layers = layer_specs(unwrap(model), layers, exclude, bias)
        if projection == "exact" or (projection is None and curvature == "exact"):
            projection = exact_projection(self.layers)
        self.projection = projection_config(projection, curvature)
        if self.projection["type"] != "factored" and curvature in ("kfac", "ekfac", "exact"):
            raise ValueError(f"curvature {curvature!r} needs the factored projection (Kronecker factors per layer); "
                             f"use curvature='identity', 'fisher' or 'lowrank' with a {self.projection['type']} "
                             "projection")
        if isinstance(damping, str) and damping != "auto":
            raise ValueError(f"damping must be 'auto', a Damping, a number (absolute λ) or None, got {damping!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.module = unwrap(self.model)  # what the passes run (a compiled model's original module)
        self.loss_fn, self.query_loss_fn, self.backend = loss_fn, query_loss_fn or loss_fn, backend
        self.curvature_method, self.damping, self.rank = curvature, damping, rank
        self.solver_config = SolverConfig.of(solver)
        self.featurizer = Featurizer(self.module, self.layers, loss_fn, self.projection, self.device, backend,
                                     trim_padding, autocast)
        check_dense_blocks(curvature, self.dims)
        if curvature == "exact":
            projected = [name for name in self.dims if not all(self.featurizer.projections.exact_sides(name))]
            if projected:
                raise ValueError(f"curvature 'exact' needs unprojected features, the projection "
                                 f"{self.projection} projects layer(s) {projected}: pass projection='exact'")
        self.solver: InverseHVP | None = None
        self._dtype = self.featurizer.dtype
        self.curvature: Curvature | None = None
        self._featurized_kfac: tuple[str, cv.KFACFitter] | None = None  # (store path, factors) of featurize
        self._kept_tokens: tuple[str, Any, KeptTokens] | None = None  # (store path, content key, tokens)

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
        projection = recorded_projection(record)
        layers = [LayerSpec(**spec) for spec in record["layers"]]
        return cls(model, layers, loss_fn=loss_fn, projection=projection, **kwargs)

    # -- layout

    @property
    def dims(self) -> dict[str, tuple[int, int]]:
        """{block: (k_out, k_in)} per layer (factored), or {"dense": (1, k)} / {"sparse": (1, k)}."""
        return self.featurizer.dims

    @property
    def width(self) -> int:
        """Feature columns per example."""
        return self.featurizer.width

    def features(self, batch: Any) -> torch.Tensor:
        """Projected per-example gradients of one batch, not preconditioned.

        Returns:
            (B, width) float32 (float64 for float64 models) on ``device``, layout order.
        """
        return self.featurizer.features(batch)

    # -- featurize

    def featurize(self, batches: Batches, path: str | os.PathLike, *, dtype: str | torch.dtype = "bfloat16",
                  rows_per_shard: int | None = None, total: int | None = None, overwrite: bool = False,
                  keep_tokens: bool = False, progress: bool = True) -> Store:
        """Write per-example features of ``batches`` to a store; resumes an interrupted run.

        Batches whose ids are all in the store already are skipped without a
        forward pass; the finished store is byte-identical to an uninterrupted run.
        Under an initialised process group (torchrun) the ranks split the
        batches and rank 0 merges their sub-stores into the same store
        (:mod:`airtrace.attribute.ranks`).

        Args:
            batches: (ids, batch) pairs with ids unique across the dataset, a DataLoader or a
                dataset (ids = dataset index; see :func:`airtrace.as_batches`).
            path: store directory (new, empty, or an incomplete store from the same settings).
            dtype: stored dtype, "float32", "bfloat16" or "float16".
            rows_per_shard: rows per shard file; default 4096, fewer for wide rows so that a shard
                stays within 128 MiB (:func:`airtrace.store.default_rows_per_shard`).
            total: number of examples, for the progress bar's ETA (default: the length of a
                DataLoader's sampler or a dataset, or the ids of a list of pairs).
            overwrite: replace an existing store at ``path``.
            keep_tokens: factored projection, one process, not resumed: keep every example's projected
                tokens in memory (:class:`airtrace.attribute.tokens.KeptTokens`, at most
                :data:`~airtrace.attribute.tokens.KEEP_TOKENS_BUDGET` bytes; about ``4 · T · (k_in + k_out)``
                bytes per layer of an example of T tokens), so that ``score(..., token_batches=...)`` of this
                store computes its per-token scores without running the listed examples again.
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
        batches = as_batches(batches)
        total = example_count(batches) if total is None else total
        try:
            if distributed.active():
                write = functools.partial(self._write_features, dtype=dtype, rows_per_shard=rows_per_shard)
                return featurize_ranks(write, batches, path, total=total, overwrite=overwrite, progress=progress)
            return self._write_features(batches, path, dtype=dtype, rows_per_shard=rows_per_shard, total=total,
                                        overwrite=overwrite, keep_tokens=keep_tokens, progress=progress)
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
        stored = dict(zip(store.ids, stored_digests(store)))
        for ids, batch in pairs(batches, "batches"):
            missing = [i for i in ids if i not in stored]
            if missing:
                raise StoreError(f"{store.path}: the store is finished but lacks example id {missing[0]!r} of "
                                 "batches. Fix: write to a new directory, or pass overwrite=True to write it again.")
            check_same_data(store.path, ids, content_digests(batch, len(ids)), stored)
        return store

    def _write_features(self, batches: Batches, path: str | os.PathLike, *, dtype: str | torch.dtype,
                        rows_per_shard: int, total: int | None, overwrite: bool, progress: bool,
                        keep_tokens: bool = False) -> Store:
        """The featurize loop of one process: features of ``batches`` appended to the store at ``path``;
        returns the finished store."""
        writer = StoreWriter(path, model_fingerprint(self.module), list(self.dims.items()), dtype, rows_per_shard,
                             {"projection": self.featurizer.record(), "curvature": None,
                              **({"autocast": self.featurizer.autocast} if self.featurizer.autocast else {})},
                             extras={CONTENT: ("int64", (2,))}, overwrite=overwrite)
        with writer:
            done = {}
            if writer.rows_done:
                committed = Store.open(writer.path, allow_incomplete=True)
                done = dict(zip(committed.ids, stored_digests(committed)))
            kfac = self._kfac_alongside() if not done else None
            kept = KeptTokens() if keep_tokens and not done and self.featurizer.projections is not None else None
            self._featurized_kfac = self._kept_tokens = None
            with progress_bar(total, "featurize", progress, initial=writer.rows_done) as bar:
                for ids, batch in pairs(batches, "batches"):
                    digests = content_digests(batch, len(ids))
                    check_same_data(writer.path, ids, digests, done)
                    keep = [j for j, i in enumerate(ids) if i not in done]
                    if len(keep) < len(ids):
                        kfac = kept = None  # resumed: the factors would miss the rows written before
                    if keep:
                        sink = None if kept is None else (
                            lambda rows, part, parts, feats, ids=ids: kept.add([ids[j] for j in rows], part, parts,
                                                                               feats))
                        features = checked_rows(self.featurizer.features(batch, kfac, tokens=sink), ids)
                        with stage("store_write", rows=len(keep),
                                   nbytes=len(keep) * writer.width * writer.dtype.itemsize):
                            writer.append(features[keep], [ids[j] for j in keep], **{CONTENT: digests[keep]})
                        bar.update(len(keep))
        store = Store.open(path)
        if kfac is not None:
            self._featurized_kfac = (os.path.abspath(writer.path), kfac)
            save_kfac_sums(store, kfac)
        if kept is not None and not kept.overflowed:
            self._kept_tokens = (os.path.abspath(writer.path), store.content_key(), kept)
        return store

    def _kfac_alongside(self) -> cv.KFACFitter | None:
        """A K-FAC fitter for featurize to fill from the same forward/backward passes, when fit will need one."""
        wanted = self.curvature_method in ("kfac", "ekfac", "exact") and self.featurizer.projections is not None
        return cv.KFACFitter() if wanted and not distributed.active() else None  # fit applies the damping

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
        the store's K-FAC sidecar (:func:`airtrace.store.sidecars.kfac_sidecar`), which any later fit of
        that store uses (the damping is applied here). With ``damping="auto"``
        the moments of the per-example features that the rule reads
        (:mod:`airtrace.curvature.damping`) are summed during the pass over
        features (K-FAC: during its own pass, or one read of ``store``). Under
        an initialised process group the ranks split the batches and the store's
        shards, the fitters' sums are added over ranks, every rank gets the same
        curvature and rank 0 saves it.

        Args:
            batches: training batches as :meth:`featurize` takes them (ids are not used).
            path: save the factors here (safetensors) when given.
            store: training features written by :meth:`featurize` of this model.
            total: examples in ``batches``, for the progress bars' ETA (default: the store's rows, else
                as in :meth:`featurize`).
            progress: show progress bars.

        Returns:
            The fitted :class:`Curvature` (damping per layer in ``.damping``).
        """
        store = None if store is None else self._checked_store(store)
        if store is not None and len(store) == 0:
            raise StoreError(f"{store.path}: the store holds no rows (was the training set empty?); "
                             "nothing to fit the curvature on")
        batches = None if batches is None else as_batches(batches)
        if total is None:
            total = len(store) if store is not None else example_count(batches)
        method = "ekfac" if self.curvature_method == "exact" else self.curvature_method
        if self.curvature_method == "exact":
            if batches is None:
                raise ValueError("curvature 'exact' needs the training batches: its solver computes curvature "
                                 "products over them (fit(train_batches, store=...))")
            reiterable(batches, "batches")
        moments = cv.MomentAccumulator() if self.damping == "auto" and method != "identity" else None
        fixed = None if moments is not None else self.damping
        if method == "identity":
            curvature = cv.identity(self.dims)
        elif method in ("fisher", "lowrank"):
            fitter = cv.FisherFitter(fixed) if method == "fisher" else cv.LowRankFitter(self.rank, fixed)
            curvature = self._fit_features(fitter, batches, store, total, progress, moments, method)
        else:
            if method == "ekfac" and store is None:
                reiterable(batches, "batches")
            featurized = self._featurized_kfac_of(store)
            kfac_moments = moments if method == "kfac" and store is None else None
            fitter = featurized or self._fit_kfac(batches, total, progress, kfac_moments)
            if method == "kfac":
                if moments is not None and store is not None:
                    self._fit_features(moments, None, store, total, progress)
                fitter.damping = self._auto_damping(method, moments) if moments is not None else as_damping(fixed)
                curvature = fitter.finalize()
            else:
                ekfac = cv.EKFACFitter(fitter.finalize(), fixed)  # only the K-FAC eigenbases are used
                curvature = self._fit_features(ekfac, batches, store, total, progress, moments, method)
        curvature.fingerprint = model_fingerprint(self.module)
        curvature.store_key = None if store is None else store.content_key()
        if path is not None:
            with distributed.all_or_none("saving the curvature"):
                if distributed.is_main():
                    curvature.save(path)
        self.curvature = curvature
        if self.curvature_method == "exact":
            self.solver = self._inverse_hvp(batches, curvature, len(store) if store is not None else None)
        return curvature

    def _inverse_hvp(self, batches: Batches, preconditioner: Curvature, n: int | None) -> InverseHVP:
        """The exact solver over ``batches`` with the damping (and, for "cg", the preconditioner) of the EK-FAC fit."""
        if distributed.active():
            raise ValueError("curvature 'exact' runs in one process (its solver passes over every batch per product)")
        device_batches = DeviceBatches(batches, self.device)
        n = device_batches.count() if n is None else n
        products = CurvatureProducts(self.model, self.layers, self.loss_fn, device_batches, n,
                                     matrix=self.solver_config.matrix)
        return InverseHVP(products, preconditioner.damping, self.solver_config,
                          preconditioner if self.solver_config.method == "cg" else None)

    def _featurized_kfac_of(self, store: Store | None) -> cv.KFACFitter | None:
        """A fitter holding the K-FAC sums :meth:`featurize` accumulated while writing ``store`` in full, if it did
        (kept in memory by this Attributor, or in the store's K-FAC sidecar by any); fit sets its damping."""
        if store is None:
            return None
        if self._featurized_kfac is not None:
            path, kept = self._featurized_kfac
            if path == os.path.abspath(store.path) and kept.n_examples == len(store):
                fitter = cv.KFACFitter()
                fitter.float32_products = kept.float32_products
                fitter.load_states([kept.state()])
                return fitter
        fitter = load_kfac_sums(store, float32_products=self._dtype != torch.float64)
        if fitter is None or fitter.n_examples != len(store) or fitter.dims != self.dims:
            return None
        return fitter

    def _fit_kfac(self, batches: Batches, total: int | None, progress: bool,
                  moments: cv.MomentAccumulator | None) -> cv.KFACFitter:
        """The K-FAC pass over ``batches`` (this rank's part), summed over ranks; with ``moments``, the per-example
        features of the same passes go there. fit sets the fitter's damping."""
        fitter = cv.KFACFitter()
        fitter.float32_products = self._dtype != torch.float64  # also on a rank that gets no batch
        with progress_bar(distributed.share(total), "fit: K-FAC factors", progress and distributed.is_main()) as bar:
            for ids, batch in pairs(distributed.rank_batches(batches), "batches"):
                features = checked_rows(self.featurizer.features(batch, fitter), ids)
                if moments is not None:
                    moments.update(self.featurizer.split(features))
                bar.update(len(ids))
        distributed.reduce_fitter(fitter)
        if moments is not None:
            distributed.reduce_fitter(moments)
        return fitter

    def _auto_damping(self, method: str, moments: cv.MomentAccumulator) -> cv.Damping:
        """The ``"auto"`` rule's per-layer factors of a ``method`` curvature from the moments of the training
        features (summed over ranks); for curvature "exact" the ``"stationary"`` λ of
        :func:`airtrace.curvature.damping.stationary_damping` (the ``"auto"`` factors when it is not positive)."""
        finalized = moments.finalize()
        if self.curvature_method == "exact":
            layout = ParameterLayout(self.module, self.layers)
            theta = layout.vector({name: self.module.get_parameter(name).detach() for name in layout.names})
            mean = torch.cat([finalized.mean[spec.name].to(theta.device) for spec in self.layers])
            lam, cosine = stationary_damping(mean, theta)
            if lam > 0:
                return cv.Damping(value=lam, rule="stationary", criterion={"lambda": lam, "cosine": cosine})
            log.warning("damping 'auto' (curvature 'exact'): the mean training gradient does not point against "
                        "the weights (cosine %.3g), no L2 strength to read; using the EK-FAC 'auto' factors", cosine)
        factors, ratios = auto_factors(method, finalized)
        return cv.Damping(layer_factors=factors, rule="auto", criterion=ratios)

    def _fit_features(self, fitter, batches: Batches | None, store: Store | None, total: int | None,
                      progress: bool, moments: cv.MomentAccumulator | None = None, method: str | None = None):
        """Feed per-example features (store shards, else batches; this rank's part) to a fitter and sum it over
        ranks; with ``moments``, feed them the same features and give the fitter the ``"auto"`` damping of
        ``method``.

        Returns:
            ``fitter.finalize()``.
        """
        sinks = [fitter] if moments is None else [fitter, moments]
        with progress_bar(distributed.share(total), f"fit: {self.curvature_method}",
                          progress and distributed.is_main()) as bar:
            if store is not None:
                for chunk in timed_iter(distributed.rank_shards(store).iter_shards(self.device)):
                    with stage("fit_update", rows=chunk.features.shape[0]):
                        for sink in sinks:
                            sink.update(self.featurizer.split(chunk.features))
                    bar.update(chunk.features.shape[0])
            else:
                for ids, batch in pairs(distributed.rank_batches(batches), "batches"):
                    features = checked_rows(self.features(batch), ids)
                    with stage("fit_update", rows=len(ids)):
                        for sink in sinks:
                            sink.update(self.featurizer.split(features))
                    bar.update(len(ids))
        for sink in sinks:
            distributed.reduce_fitter(sink)
        if moments is not None:
            fitter.damping = self._auto_damping(method, moments)
        return fitter.finalize()

    def load_curvature(self, path: str | os.PathLike) -> Curvature:
        """Use the curvature saved by ``fit(..., path)``; its method replaces ``curvature``.

        Raises:
            ValueError: unreadable file, layers / dims that differ from this Attributor's, or curvature "exact"
                (its solver needs the training batches: call ``fit``).
        """
        if self.curvature_method == "exact":
            raise ValueError("curvature 'exact' is fitted with fit(train_batches, store=...): its solver needs the "
                             "training batches for its curvature products, not only a saved file")
        curvature = Curvature.load(path)
        if curvature.dims != self.dims:
            raise ValueError(f"{os.fspath(path)}: the curvature covers {curvature.dims}, this Attributor's "
                             f"features are {self.dims}; fit it on this store's layers and projection")
        self.curvature, self.curvature_method = curvature, curvature.method
        return curvature

    def _fitted(self) -> Curvature:
        if self.curvature_method == "exact" and self.solver is None:
            raise ValueError("no exact solver yet: call fit(train_batches, store=...) before scoring (the solver "
                             "needs the training batches for its curvature products)")
        if self.curvature is None:
            if self.curvature_method != "identity":
                raise ValueError(f"no {self.curvature_method!r} curvature yet: call fit(...) or "
                                 "load_curvature(path) before scoring")
            self.curvature = cv.identity(self.dims)
        return self.curvature

    def _precondition(self, features: torch.Tensor, exact: bool = True) -> torch.Tensor:
        """H⁻¹ applied to (rows, width) features, block by block -> (rows, width); see Curvature.precondition."""
        with stage("precondition", rows=features.shape[0]):
            curvature = self._fitted()
            if self.solver is not None:
                return self.solver.solve(features).to(accumulation_dtype(features.dtype))
            pre = curvature.precondition(self.featurizer.split(features), exact=exact)
            return torch.cat([pre[name].reshape(features.shape[0], -1) for name in self.dims], dim=1)

    def _precondition_rows(self, features: torch.Tensor) -> torch.Tensor:
        """H⁻¹ on store rows for self-influence: float32 through the fused kernels (float64 stays exact)."""
        return self._precondition(features, exact=False)

    # -- score

    def _checked_store(self, store: Store | str | os.PathLike, fingerprint: str | None = None) -> Store:
        """Open a store and check it holds this model's features (``fingerprint``: the model's, when known) with
        this layout and projection."""
        store = store if isinstance(store, Store) else Store.open(store)
        store.check_fingerprint(fingerprint or model_fingerprint(self.module))
        ours, theirs = essential(self.featurizer.record()), essential(store.meta.get("projection") or {})
        if ours != theirs or [(b.name, b.shape) for b in store.layout] != list(self.dims.items()):
            raise StoreError(f"{store.path}: the store was featurized with projection {theirs}, this Attributor "
                             f"uses {ours}. Fix: Attributor.from_store(model, store, ...) or featurize again")
        return store

    def _store_and_curvature(self, store: Store | str | os.PathLike) -> tuple[Store, Curvature]:
        """The checked store and the fitted curvature, refused unless fitted for this model and this store."""
        fingerprint = model_fingerprint(self.module)
        store = self._checked_store(store, fingerprint)
        curvature = self._fitted()
        curvature.check_for(fingerprint, store.content_key(), store.path)
        return store, curvature

    def self_influence(self, store: Store | str | os.PathLike, *, progress: bool = True) -> torch.Tensor:
        """``ĝ_xᵀ H⁻¹ ĝ_x`` of every training example (n,) float64, cached in a store sidecar."""
        store, curvature = self._store_and_curvature(store)
        key = self_influence_key(store, curvature)
        dtype = accumulation_dtype(self._dtype)
        return store_self_influence(store, key, self._precondition_rows, device=self.device, dtype=dtype,
                                    progress=progress)

    def _queries(self, query_batches: Batches, progress: bool = False) -> tuple[list, torch.Tensor, torch.Tensor]:
        """Query ids, their preconditioned features q̃ (q, width) and their raw features ĝ_q (q, width), through
        ``query_loss_fn``."""
        ids, raw = [], []
        query_batches = as_batches(query_batches)
        with progress_bar(example_count(query_batches), "queries", progress) as bar:
            for qids, batch in pairs(query_batches, "query_batches"):
                raw.append(checked_rows(self.featurizer.features(batch, loss_fn=self.query_loss_fn), qids))
                ids.extend(qids)
                bar.update(len(qids))
        if not raw:
            raise ValueError("query_batches yielded no examples")
        raw = torch.cat(raw)
        return ids, self._precondition(raw), raw

    def score(self, query_batches: Batches, store: Store | str | os.PathLike, *, topk: int = 10,
              metric: str = "inner", order: str = "top", matrix: bool = False,
              full_matrix_path: str | os.PathLike | None = None, groups: Sequence[Sequence[int]] | None = None,
              token_batches: Batches | None = None, index: Any = None, nprobe: int | None = None,
              ef: int | None = None, candidates: int | None = None, rerank: bool = True,
              recall: bool | None = None, progress: bool = True) -> Scores:
        """Score queries against every training example of a store, streamed shard by shard.

        Query features go through the same capture and projection as the store
        (with ``query_loss_fn``), then the fitted curvature: ``q̃ = H⁻¹ ĝ_q``. See
        :mod:`airtrace.scoring` for the metrics; a score > 0 means the training
        example lowers the query's loss (helps), < 0 that it raises it (harmful).
        Memory is bounded by a shard, not by n × q (unless ``matrix``). Under an
        initialised process group every rank scores a contiguous block of the
        shards and the per-rank top-k (global indices) and group sums are
        combined on every rank (:mod:`airtrace.distributed`).

        With ``index`` the scores come from two stages (:mod:`airtrace.index`):
        candidates from an ANN index built by :func:`airtrace.index.build_index`
        (``airtrace index build``) for this store, curvature and metric, or from
        embeddings (:class:`airtrace.index.EmbeddingCandidates`, e.g. AirRep's); then the
        exact scores of only the candidate rows, read from the store. The result's
        ``stage`` says which produced it, ``recall`` the measured recall@topk.

        Args:
            query_batches: queries, as :meth:`featurize` takes batches.
            store: training features of this model (:meth:`featurize`).
            topk: results per query (and per order).
            metric: "inner", "cosine" or "relative".
            order: "top" (most helpful first), "bottom" (most harmful first) or "both".
            matrix: also return the full (q, n) score matrix in memory (``Scores.matrix``);
                refused when it would take more than half of the machine's memory.
            full_matrix_path: also write the (q, n) score matrix (tensor "scores",
                float32 / float64) to this safetensors file (single process only).
            groups: G lists of train row indices; adds (q, G) group sums of the scores.
            token_batches: the training batches again: the listed rows (top and/or
                bottom) are attributed token by token (``Scores.tokens``, see
                :mod:`airtrace.attribute.tokens`): from the tokens this Attributor's
                ``featurize(..., keep_tokens=True)`` of this store kept, else recomputed.
            index: None (the exact streamed pass), "flat" / "ivfpq" / "hnsw" (that index beside the
                store), a path to an index file, an :class:`airtrace.index.Index` or an
                :class:`airtrace.index.EmbeddingCandidates`.
            nprobe: inverted lists an ivfpq index searches (default 32).
            ef: candidates an hnsw index keeps while searching (default max(64, candidates)).
            candidates: candidates per query that are re-scored exactly (default max(100, 10 topk)).
            rerank: re-score the candidates exactly (False: the index's own, approximate, scores).
            recall: measure recall@topk with an exact pass too (None: when the store is small enough,
                see :data:`airtrace.index.rerank.EXACT_AFFORDABLE`).
            progress: show progress bars.

        Returns:
            :class:`Scores` with values / indices (q, topk) (and bottom_*), train ids,
            query ids, a sample of each query's scores, group scores (q, G) when
            ``groups`` is given, the matrix and per-token scores when asked, the stage and
            the recall, and for curvature "exact" the convergence of its solves (``solves``), on the CPU.

        Raises:
            StoreError: the store belongs to another model (fingerprint) or projection.
            IndexFileError: an index built from another store content, curvature or metric.
            SolverError: curvature "exact": a solve did not converge (see :mod:`airtrace.ihvp`).
            ValueError: bad topk / metric / order, ``full_matrix_path`` under a process group of several
                ranks, or ``index`` with what needs every row (groups, matrix, full_matrix_path, order).
        """
        check_metric(metric)
        check_order(order)
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk must be a positive int, got {topk!r}")
        if full_matrix_path is not None and distributed.active():
            raise ValueError("full_matrix_path is not supported in a distributed run (each rank scores only its "
                             "shards); score with one process to write the full matrix")
        store, curvature = self._store_and_curvature(store)
        if index is not None and (groups is not None or full_matrix_path is not None or matrix or order != "top"
                                  or distributed.active()):
            raise ValueError("index= gives the top-k only, in one process: groups, matrix, full_matrix_path and "
                             "order='bottom' / 'both' need the exact pass over every row (drop index=), and a "
                             "distributed run scores exactly")
        solved_before = len(self.solver.reports) if self.solver is not None else 0
        query_ids, Q, raw = self._queries(query_batches, progress and distributed.is_main())
        if index is not None:
            scores = two_stage_scores(Q, raw, query_ids, store, curvature, metric, topk, index, self._precondition_rows,
                                      self.backend, progress, nprobe=nprobe, ef=ef, candidates=candidates,
                                      rerank=rerank, recall=recall)
        else:
            scores = exact_scores(Q, query_ids, store, curvature, metric, topk, order, self._precondition_rows,
                                  self.backend, progress, matrix=matrix, full_matrix_path=full_matrix_path,
                                  groups=groups)
        scores.solves = None if self.solver is None else [r.as_dict() for r in self.solver.reports[solved_before:]]
        if token_batches is not None:
            wanted: dict = {}
            for _, _, rows, ids in scores.rankings():
                for qi, (row_indices, row_ids) in enumerate(zip(rows.tolist(), ids)):
                    for row_index, train_id in zip(row_indices, row_ids):
                        if row_index >= 0:
                            wanted.setdefault(train_id, []).append((qi, row_index))
            kept = self._kept_tokens
            kept = kept[2] if kept is not None and kept[:2] == (os.path.abspath(store.path), store.content_key()) \
                else None
            scores.tokens = token_scores(self.featurizer, Q, wanted, as_batches(token_batches), metric=metric,
                                         precondition=self._precondition_rows, kept=kept,
                                         progress=progress and distributed.is_main())
        return scores
