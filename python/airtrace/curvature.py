"""Curvature in projected-gradient space, per layer: identity, damped Fisher, K-FAC, EK-FAC, low rank.

Every method ends in a :class:`Curvature`: one damped inverse per layer, applied
to per-example projected gradients by :meth:`Curvature.precondition` and saved
to / loaded from one safetensors file.

Conventions:
    * Features are per-example projected gradients ``ĝ_b`` of shape
      (k_out, k_in) per layer (``airtrace.ops.project_factored``). ``vec`` is
      row-major: entry (i, j) is index ``i * k_in + j``, which pairs with
      ``kron(S_G, S_A)``.
    * N is the number of examples. Fisher: ``F = (1/N) Σ_b vec(ĝ_b) vec(ĝ_b)ᵀ``.
      K-FAC factors sum over tokens and divide by examples:
      ``S_A = (1/N) Σ_b Σ_t a_bt a_btᵀ``, ``S_G = (1/N) Σ_b Σ_t g_bt g_btᵀ`` with
      ``a_bt = A_bt P_in`` (k_in,) and ``g_bt = G_bt P_out`` (k_out,). With T
      tokens per example ``S_G ⊗ S_A`` is thus of order T × F; EK-FAC's second
      pass refits the eigenvalues on the per-example features, and with relative
      damping a curvature scaled by c only scales the preconditioned features by
      1/c, so rankings do not depend on this convention.
    * Everything is accumulated, factorised (eigh, Cholesky) and applied in
      float64, except that the K-FAC / EK-FAC fitters form each batch's
      products in the features' precision (float32 unless float64) before
      adding them to float64 sums. ``precondition`` returns float32 (float64 for
      float64 inputs).
    * Damping (:class:`Damping`): by default ``λ = 0.1 × mean eigenvalue`` of the
      layer's spectrum (F for Fisher and low rank; the Kronecker spectrum
      ``e_G e_Aᵀ`` for K-FAC; Λ for EK-FAC), or an absolute value. The λ used per
      layer is kept in ``Curvature.damping`` and in the saved metadata.
    * A factor whose lowest eigenvalue is below ``-PSD_TOL × max|eigenvalue|`` is
      rejected (``PSD_TOL_FLOAT32`` for K-FAC factors summed from float32
      products); smaller negative eigenvalues (round-off) are clamped to 0.

Fitting is streamed: call ``update(...)`` once per batch, then ``finalize()``.
EK-FAC takes two passes over the data::

    kfac_fitter = KFACFitter()                 # phase 1: Kronecker factors
    for a, g, mask in token_batches:           # {layer: (B, T, k_in)}, {layer: (B, T, k_out)}, (B, T)
        kfac_fitter.update(a, g, mask)
    kfac_fit = kfac_fitter.finalize()          # K-FAC; its eigenbases start phase 2

    ekfac_fitter = EKFACFitter(kfac_fit)       # phase 2: eigenvalue corrections
    for features in feature_batches:           # {layer: (B, k_out, k_in)}
        ekfac_fitter.update(features)
    ekfac_fit = ekfac_fitter.finalize()
    ekfac_fit.save("curvature.safetensors")
    preconditioned = Curvature.load("curvature.safetensors").precondition(query_features)
"""

from __future__ import annotations

import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from airtrace import ops
from airtrace._checks import positive_int
from airtrace.ref.project import accumulation_dtype

F64 = torch.float64
PSD_TOL = 1e-9
PSD_TOL_FLOAT32 = 1e-5
"""PSD tolerance of K-FAC factors summed from float32 batch products (round-off near 1e-7 of the
largest eigenvalue)."""
METADATA_KEY = "airtrace.curvature"
STATE_KEY = "airtrace.fitter_state"
FORMAT_VERSION = 1

Dims = tuple[int, int]
Features = Mapping[str, torch.Tensor]
# (n_examples, dims, {layer: [float64 sums]}) of a streaming fitter, see _Accumulator.state.
AccumulatorState = tuple[int, "dict[str, Dims] | None", "dict[str, list[torch.Tensor]]"]
# take(key, shape) -> float64 tensor: reads one tensor of a layer from a file (None in shape = any size).
TensorReader = Callable[[str, tuple], torch.Tensor]


# --------------------------------------------------------------------------- damping


@dataclass(frozen=True)
class Damping:
    """How λ is chosen per layer: ``value`` when given (absolute), else ``factor`` × mean eigenvalue.

    Attributes:
        value: absolute λ > 0, or None for relative damping.
        factor: relative factor > 0 (ignored when ``value`` is set).
    """

    value: float | None = None
    factor: float = 0.1

    def __post_init__(self) -> None:
        if self.value is not None:
            _check_positive("Damping.value", self.value)
        _check_positive("Damping.factor", self.factor)

    @property
    def relative_factor(self) -> float | None:
        """The relative factor in use, None for absolute damping."""
        return None if self.value is not None else float(self.factor)

    def resolve(self, layer: str, mean_eigenvalue: float) -> float:
        """λ for one layer given the mean eigenvalue of its spectrum."""
        if self.value is not None:
            return float(self.value)
        lam = float(self.factor * mean_eigenvalue)
        if not lam > 0:
            raise ValueError(
                f"layer {layer!r}: relative damping {self.factor} × mean eigenvalue {mean_eigenvalue:.6g} "
                f"= {lam:.6g} is not positive (all-zero features?); pass an absolute Damping(value=...)"
            )
        return lam


def _check_positive(name: str, x) -> None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {x!r}")


def _check_rank(rank) -> None:
    positive_int("rank", rank)


def _as_damping(damping: Damping | float | None) -> Damping:
    """None -> the default relative damping; a number -> absolute damping."""
    if damping is None:
        return Damping()
    return damping if isinstance(damping, Damping) else Damping(value=damping)


# --------------------------------------------------------------------------- validation


def _check_finite(layer: str, what: str, t: torch.Tensor) -> None:
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(
            f"layer {layer!r}: {what} contain {bad} NaN/Inf value(s); fix the inputs "
            "(e.g. fp16 overflow, a diverged loss) before fitting or preconditioning"
        )


def _check_tensor(layer: str, what: str, t, shape_doc: str) -> None:
    """``t`` must be a finite floating tensor with as many dims as ``shape_doc`` names."""
    ndim = shape_doc.count(",") + 1
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"layer {layer!r}: {what} must be a torch.Tensor {shape_doc}, got {type(t).__name__}")
    if t.dim() != ndim or not t.is_floating_point():
        raise ValueError(f"layer {layer!r}: {what} must be a float tensor {shape_doc}, got {t.dtype} {tuple(t.shape)}")
    _check_finite(layer, what, t)


def _check_mapping(name: str, m) -> None:
    if not isinstance(m, Mapping) or not m:
        raise ValueError(f"{name} must be a non-empty dict {{layer name: tensor}}, got {type(m).__name__}")


def _check_features(features: Features, dims: Mapping[str, Dims] | None = None) -> dict[str, torch.Tensor]:
    """Validate ``{layer: (B, k_out, k_in)}``; with ``dims``, layers must be known and match them."""
    _check_mapping("features", features)
    for name, x in features.items():
        _check_tensor(name, "features", x, "(B, k_out, k_in)")
        if dims is not None:
            if name not in dims:
                raise ValueError(f"layer {name!r} is not in this curvature; its layers are {sorted(dims)}")
            if tuple(x.shape[1:]) != dims[name]:
                raise ValueError(
                    f"layer {name!r}: features must be (B, k_out, k_in) = (B, {dims[name][0]}, {dims[name][1]}), "
                    f"got {tuple(x.shape)}"
                )
    return dict(features)


def _batch_size(batch: Mapping[str, torch.Tensor]) -> int:
    """The common B of every layer's tensor in one batch."""
    sizes = {name: x.shape[0] for name, x in batch.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"every layer of a batch must have the same batch size B, got {sizes}")
    return next(iter(sizes.values()))


def _check_tokens(activations: Features, gradients: Features, mask: torch.Tensor | None) -> None:
    """Validate ``{layer: (B, T, k_in)}``, ``{layer: (B, T, k_out)}`` and an optional (B, T) mask."""
    _check_mapping("activations", activations)
    _check_mapping("gradients", gradients)
    if set(activations) != set(gradients):
        raise ValueError(
            f"activations and gradients must have the same layers, got {sorted(activations)} and {sorted(gradients)}"
        )
    for name, a in activations.items():
        g = gradients[name]
        _check_tensor(name, "activations", a, "(B, T, k_in)")
        _check_tensor(name, "gradients", g, "(B, T, k_out)")
        if g.shape[:2] != a.shape[:2]:
            raise ValueError(
                f"layer {name!r}: gradients (B, T, k_out) {tuple(g.shape)} and activations (B, T, k_in) "
                f"{tuple(a.shape)} must share (B, T)"
            )
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != a.shape[:2]):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"layer {name!r}: mask must be a (B, T) = {tuple(a.shape[:2])} tensor, got {shape}")
    if mask is not None and not bool(torch.isfinite(mask.to(F64)).all()):
        raise ValueError("mask contains NaN/Inf values")


def _checked_spectrum(layer: str, what: str, eigenvalues: torch.Tensor, tol: float = PSD_TOL) -> torch.Tensor:
    """Reject an eigenvalue below ``-tol × max|eigenvalue|``; clamp round-off negatives to 0."""
    scale = float(eigenvalues.abs().max())
    lowest = float(eigenvalues.min())
    if lowest < -tol * scale:
        raise ValueError(
            f"layer {layer!r}: {what} is not positive semi-definite: most negative eigenvalue {lowest:.6g} "
            f"(largest |eigenvalue| {scale:.6g}); it must be an average of outer products"
        )
    return eigenvalues.clamp_min(0)


def _eigh(layer: str, what: str, S: torch.Tensor, tol: float = PSD_TOL) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending, >= 0) and row-major eigenvectors (columns) of the symmetrised float64 S."""
    S = S.to(F64)
    eigenvalues, eigenvectors = torch.linalg.eigh((S + S.T) / 2)
    return _checked_spectrum(layer, what, eigenvalues, tol), eigenvectors.contiguous()


def _square(layer: str, what: str, S) -> torch.Tensor:
    _check_tensor(layer, what, S, "(n, n)")
    if S.shape[0] != S.shape[1]:
        raise ValueError(f"layer {layer!r}: {what} must be a square (n, n) matrix, got {tuple(S.shape)}")
    return S.to(F64)


def _fisher_matrix(layer: str, F) -> tuple[torch.Tensor, Dims]:
    """(k_out, k_in, k_out, k_in) Fisher -> symmetrised (n, n) float64 matrix and (k_out, k_in)."""
    _check_tensor(layer, "Fisher", F, "(k_out, k_in, k_out, k_in)")
    if F.shape[:2] != F.shape[2:]:
        raise ValueError(f"layer {layer!r}: Fisher must be (k_out, k_in, k_out, k_in), got {tuple(F.shape)}")
    dims = (F.shape[0], F.shape[1])
    n = dims[0] * dims[1]
    M = F.to(F64).reshape(n, n)
    return (M + M.T) / 2, dims


# --------------------------------------------------------------------------- per-layer inverses


class LayerInverse(ABC):
    """Damped inverse curvature of one layer, applied to (B, k_out, k_in) float64 features.

    Attributes:
        dims: (k_out, k_in).
        damping: λ used (0.0 for identity).
    """

    dims: Dims
    damping: float

    @abstractmethod
    def apply(self, features: torch.Tensor) -> torch.Tensor:
        """(B, k_out, k_in) float64 or float32 -> the same shape, dtype and device."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that define this inverse, by name (saved as ``<layer>/<name>``)."""

    @classmethod
    @abstractmethod
    def from_tensors(cls, dims: Dims, damping: float, take: TensorReader) -> LayerInverse:
        """Rebuild from saved tensors read with ``take(name, expected shape)``."""


@dataclass(frozen=True)
class IdentityInverse(LayerInverse):
    """No preconditioning."""

    dims: Dims
    damping: float = 0.0

    def apply(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    @classmethod
    def from_tensors(cls, dims: Dims, damping: float, take: TensorReader) -> IdentityInverse:
        return cls(dims)


@dataclass(frozen=True)
class CholeskyInverse(LayerInverse):
    """``(F + λI)⁻¹ vec(ĝ)`` by ``cholesky_solve``.

    Attributes:
        cholesky: (n, n) float64 lower Cholesky factor of F + λI, n = k_out * k_in.
    """

    dims: Dims
    damping: float
    cholesky: torch.Tensor

    def apply(self, features: torch.Tensor) -> torch.Tensor:
        v = features.reshape(features.shape[0], -1).T  # (n, B)
        return torch.cholesky_solve(v, self.cholesky.to(features.device, features.dtype)).T.reshape(features.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"cholesky": self.cholesky}

    @classmethod
    def from_tensors(cls, dims: Dims, damping: float, take: TensorReader) -> CholeskyInverse:
        n = dims[0] * dims[1]
        return cls(dims, damping, take("cholesky", (n, n)))


@dataclass(frozen=True)
class EigenbasisInverse(LayerInverse):
    """``Q_G [(Q_Gᵀ ĝ Q_A) / (Λ + λ)] Q_Aᵀ``: K-FAC (Λ = e_G e_Aᵀ) and EK-FAC (Λ fitted).

    Attributes:
        eigvecs_G: (k_out, k_out) float64 eigenvectors (columns) of S_G.
        eigvecs_A: (k_in, k_in) float64 eigenvectors (columns) of S_A.
        eigenvalues: (k_out, k_in) float64 Λ >= 0 in the basis kron(Q_G, Q_A).
    """

    dims: Dims
    damping: float
    eigvecs_G: torch.Tensor
    eigvecs_A: torch.Tensor
    eigenvalues: torch.Tensor

    def apply(self, features: torch.Tensor) -> torch.Tensor:
        """Through ``airtrace.ops.precondition``: float64 on its torch backend, float32 on the fused kernel."""
        Q_G, Q_A, Lam = (t.to(features.device, features.dtype) for t in (self.eigvecs_G, self.eigvecs_A, self.eigenvalues))
        return ops.precondition(features, Q_G, Q_A, Lam, self.damping)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"eigvecs_G": self.eigvecs_G, "eigvecs_A": self.eigvecs_A, "eigenvalues": self.eigenvalues}

    @classmethod
    def from_tensors(cls, dims: Dims, damping: float, take: TensorReader) -> EigenbasisInverse:
        k_out, k_in = dims
        return cls(
            dims, damping, take("eigvecs_G", (k_out, k_out)), take("eigvecs_A", (k_in, k_in)), take("eigenvalues", dims)
        )


@dataclass(frozen=True)
class LowRankInverse(LayerInverse):
    """Woodbury: ``(U S Uᵀ + λI)⁻¹ v = (v - U diag(s/(s+λ)) Uᵀ v) / λ``.

    Attributes:
        eigvecs: (n, r) float64 top-r eigenvectors U of F, n = k_out * k_in.
        eigenvalues: (r,) float64 matching eigenvalues s >= 0.
    """

    dims: Dims
    damping: float
    eigvecs: torch.Tensor
    eigenvalues: torch.Tensor

    def apply(self, features: torch.Tensor) -> torch.Tensor:
        U, s = (t.to(features.device, features.dtype) for t in (self.eigvecs, self.eigenvalues))
        v = features.reshape(features.shape[0], -1)  # (B, n)
        v = (v - ((v @ U) * (s / (s + self.damping))) @ U.T) / self.damping
        return v.reshape(features.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"eigvecs": self.eigvecs, "eigenvalues": self.eigenvalues}

    @classmethod
    def from_tensors(cls, dims: Dims, damping: float, take: TensorReader) -> LowRankInverse:
        U = take("eigvecs", (dims[0] * dims[1], None))
        return cls(dims, damping, U, take("eigenvalues", (U.shape[1],)))


# --------------------------------------------------------------------------- fitted curvature

INVERSES: dict[str, type[LayerInverse]] = {
    "identity": IdentityInverse,
    "fisher": CholeskyInverse,
    "kfac": EigenbasisInverse,
    "ekfac": EigenbasisInverse,
    "lowrank": LowRankInverse,
}


class Curvature:
    """A fitted curvature: one damped inverse per layer.

    Attributes:
        method: "identity", "fisher", "kfac", "ekfac" or "lowrank".
        inverses: {layer name: LayerInverse}.
        damping_factor: the relative damping factor used, None for absolute damping or identity.
        n_examples: examples the fit saw (None when built from given matrices).
    """

    def __init__(
        self,
        method: str,
        inverses: Mapping[str, LayerInverse],
        damping_factor: float | None = None,
        n_examples: int | None = None,
    ) -> None:
        if method not in INVERSES:
            raise ValueError(f"method must be one of {sorted(INVERSES)}, got {method!r}")
        self.method = method
        self.inverses = dict(inverses)
        self.damping_factor = damping_factor
        self.n_examples = n_examples

    @property
    def layers(self) -> list[str]:
        return list(self.inverses)

    @property
    def dims(self) -> dict[str, Dims]:
        """{layer: (k_out, k_in)}."""
        return {name: inv.dims for name, inv in self.inverses.items()}

    @property
    def damping(self) -> dict[str, float]:
        """{layer: λ used}."""
        return {name: inv.damping for name, inv in self.inverses.items()}

    @property
    def metadata(self) -> dict:
        """JSON-able summary, stored in the safetensors metadata under ``airtrace.curvature``."""
        return {
            "format": FORMAT_VERSION,
            "method": self.method,
            "layers": self.layers,
            "dims": {name: list(d) for name, d in self.dims.items()},
            "damping": self.damping,
            "damping_factor": self.damping_factor,
            "n_examples": self.n_examples,
        }

    def __repr__(self) -> str:
        damping = ", ".join(f"{name}: {lam:.3g}" for name, lam in self.damping.items())
        return f"Curvature(method={self.method!r}, damping_factor={self.damping_factor}, damping={{{damping}}})"

    def precondition(self, features: Features, *, exact: bool = True) -> dict[str, torch.Tensor]:
        """Apply each layer's damped inverse curvature.

        Args:
            features: {layer: (B, k_out, k_in)} projected gradients, any subset of ``layers``.
            exact: compute in float64 (default). False computes in float32 (float64 inputs
                stay float64), K-FAC / EK-FAC through the fused ``precondition`` kernel: for
                large batches such as the self-influence of a whole store.

        Returns:
            {layer: (B, k_out, k_in)} on the features' device, float32 (float64 for float64 features).

        Raises:
            ValueError: unknown layer, wrong shape, or NaN/Inf (naming the layer).
        """
        features = _check_features(features, self.dims)
        out = {}
        for name, x in features.items():
            dtype = accumulation_dtype(x.dtype)
            out[name] = self.inverses[name].apply(x.to(F64 if exact else dtype)).to(dtype)
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write the factors (``<layer>/<name>``, float64) and metadata to one safetensors file, atomically."""
        path = os.fspath(path)
        tensors = {
            f"{name}/{key}": t.detach().cpu().contiguous()
            for name, inv in self.inverses.items()
            for key, t in inv.tensors().items()
        }
        tmp = f"{path}.tmp"
        save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(self.metadata)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Curvature:
        """Read a file written by :meth:`save` (tensors on the CPU).

        Raises:
            ValueError: not a safetensors file, not an airtrace curvature, or a missing / misshapen tensor.
        """
        path = os.fspath(path)
        try:
            with safe_open(path, framework="pt") as f:
                raw = (f.metadata() or {}).get(METADATA_KEY)
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
        if raw is None:
            raise ValueError(f"{path}: not an airtrace curvature file (no {METADATA_KEY!r} metadata)")
        try:
            meta = json.loads(raw)
            method, damping, dims = meta["method"], meta["damping"], meta["dims"]
            inverse_cls = INVERSES[method]
            inverses = {
                name: inverse_cls.from_tensors(tuple(dims[name]), damping[name], _reader(path, tensors, name))
                for name in meta["layers"]
            }
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: malformed {METADATA_KEY!r} metadata ({e!r})") from e
        return cls(method, inverses, meta.get("damping_factor"), meta.get("n_examples"))


def _reader(path: str, tensors: Mapping[str, torch.Tensor], layer: str) -> TensorReader:
    def take(key: str, shape: tuple) -> torch.Tensor:
        name = f"{layer}/{key}"
        if name not in tensors:
            raise ValueError(f"{path}: missing tensor {name!r}")
        t = tensors[name]
        if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
        return t.to(F64)

    return take


# --------------------------------------------------------------------------- builders (from second moments)


def identity(dims: Mapping[str, Dims]) -> Curvature:
    """No preconditioning, for layers ``{name: (k_out, k_in)}``."""
    _check_mapping("dims", dims)
    return Curvature("identity", {name: IdentityInverse((int(d[0]), int(d[1]))) for name, d in dims.items()})


def damped_fisher(
    fisher: Features, damping: Damping | float | None = None, n_examples: int | None = None
) -> Curvature:
    """``(F + λI)⁻¹`` per layer by a float64 Cholesky factorisation.

    Args:
        fisher: {layer: (k_out, k_in, k_out, k_in)} F[i, j, k, l] = mean over examples of ĝ[i, j] ĝ[k, l]
            (symmetrised); λ relative to its mean eigenvalue trace(F) / n.
        damping: :class:`Damping`, a number (absolute λ) or None (0.1 × mean eigenvalue).
        n_examples: recorded in the metadata.

    Raises:
        ValueError: NaN/Inf, wrong shape, or a failed Cholesky (naming the layer; increase damping).
    """
    _check_mapping("fisher", fisher)
    damping = _as_damping(damping)
    inverses = {}
    for name, F in fisher.items():
        M, dims = _fisher_matrix(name, F)
        n = M.shape[0]
        lam = damping.resolve(name, float(M.diagonal().mean()))
        L, info = torch.linalg.cholesky_ex(M + lam * torch.eye(n, dtype=F64, device=M.device))
        if int(info) != 0:
            raise ValueError(
                f"layer {name!r}: Cholesky of F + λI failed (λ = {lam:.6g}, leading minor {int(info)} of {n} is not "
                "positive definite): F is not positive semi-definite or λ is too small for float64; increase the "
                "damping (a larger Damping(factor=...) or Damping(value=...))"
            )
        inverses[name] = CholeskyInverse(dims, lam, L)
    return Curvature("fisher", inverses, damping.relative_factor, n_examples)


def low_rank(
    fisher: Features, rank: int, damping: Damping | float | None = None, n_examples: int | None = None
) -> Curvature:
    """``(U diag(s) Uᵀ + λI)⁻¹`` per layer with the top-``rank`` eigenpairs of F, applied by Woodbury.

    Args:
        fisher: {layer: (k_out, k_in, k_out, k_in)} as for :func:`damped_fisher`.
        rank: r >= 1 eigenpairs kept per layer (at most k_out * k_in).
        damping: λ relative to the mean eigenvalue of the full F (so r = n equals :func:`damped_fisher`).
        n_examples: recorded in the metadata.

    Raises:
        ValueError: NaN/Inf, wrong shape, or F not PSD (naming the layer and its most negative eigenvalue).
    """
    _check_mapping("fisher", fisher)
    _check_rank(rank)
    damping = _as_damping(damping)
    inverses = {}
    for name, F in fisher.items():
        M, dims = _fisher_matrix(name, F)
        eigenvalues, eigvecs = _eigh(name, "Fisher", M)
        lam = damping.resolve(name, float(eigenvalues.mean()))
        r = min(rank, M.shape[0])
        inverses[name] = LowRankInverse(dims, lam, eigvecs[:, -r:].contiguous(), eigenvalues[-r:].contiguous())
    return Curvature("lowrank", inverses, damping.relative_factor, n_examples)


def kfac(
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    damping: Damping | float | None = None,
    n_examples: int | None = None,
    psd_tol: float = PSD_TOL,
) -> Curvature:
    """``(S_G ⊗ S_A + λI)⁻¹`` per layer from the eigendecompositions of both factors.

    Args:
        factors: {layer: (S_G (k_out, k_out), S_A (k_in, k_in))} float, symmetrised.
        damping: λ relative to the mean of the Kronecker spectrum e_G e_Aᵀ.
        n_examples: recorded in the metadata.
        psd_tol: relative tolerance of the PSD check (``PSD_TOL_FLOAT32`` for sums of float32 products).

    Raises:
        ValueError: NaN/Inf, wrong shape, or a factor that is not PSD (naming the layer).
    """
    _check_mapping("factors", factors)
    damping = _as_damping(damping)
    inverses = {}
    for name, pair in factors.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"layer {name!r}: factors must be a pair (S_G, S_A), got {type(pair).__name__}")
        e_G, Q_G = _eigh(name, "S_G", _square(name, "S_G", pair[0]), psd_tol)
        e_A, Q_A = _eigh(name, "S_A", _square(name, "S_A", pair[1]), psd_tol)
        eigenvalues = torch.outer(e_G, e_A)
        lam = damping.resolve(name, float(eigenvalues.mean()))
        inverses[name] = EigenbasisInverse((len(e_G), len(e_A)), lam, Q_G, Q_A, eigenvalues)
    return Curvature("kfac", inverses, damping.relative_factor, n_examples)


def _eigenbases(fit: Curvature) -> dict[str, EigenbasisInverse]:
    if fit.method not in ("kfac", "ekfac"):
        raise ValueError(
            f"EK-FAC needs the eigenbases of a fitted K-FAC (phase 1: KFACFitter), got a {fit.method!r} curvature"
        )
    return fit.inverses


def ekfac(
    eigenbases: Curvature,
    corrections: Features,
    damping: Damping | float | None = None,
    n_examples: int | None = None,
) -> Curvature:
    """EK-FAC: ``Q [diag(vec Λ) + λI]⁻¹ Qᵀ`` with Q = kron(Q_G, Q_A) from K-FAC and Λ fitted on the data.

    Args:
        eigenbases: a fitted "kfac" (or "ekfac") curvature whose Q_G, Q_A are reused.
        corrections: {layer: Λ (k_out, k_in)} = mean over examples of (Q_Gᵀ ĝ_b Q_A)², for every layer.
        damping: λ relative to the mean of Λ.
        n_examples: recorded in the metadata.

    Raises:
        ValueError: missing layer, wrong shape, NaN/Inf, or a negative Λ entry (naming the layer).
    """
    bases = _eigenbases(eigenbases)
    _check_mapping("corrections", corrections)
    if set(corrections) != set(bases):
        raise ValueError(f"corrections must cover the layers {sorted(bases)}, got {sorted(corrections)}")
    damping = _as_damping(damping)
    inverses = {}
    for name, Lam in corrections.items():
        base = bases[name]
        _check_tensor(name, "corrections", Lam, "(k_out, k_in)")
        if tuple(Lam.shape) != base.dims:
            raise ValueError(f"layer {name!r}: corrections must be (k_out, k_in) = {base.dims}, got {tuple(Lam.shape)}")
        Lam = _checked_spectrum(name, "EK-FAC eigenvalues", Lam.to(F64))
        lam = damping.resolve(name, float(Lam.mean()))
        inverses[name] = EigenbasisInverse(base.dims, lam, base.eigvecs_G, base.eigvecs_A, Lam)
    return Curvature("ekfac", inverses, damping.relative_factor, n_examples)


# --------------------------------------------------------------------------- streaming fitters


class _Accumulator:
    """Per-layer float64 sums over batches; the first batch fixes the layers and their (k_out, k_in)."""

    def __init__(self, dims: Mapping[str, Dims] | None = None) -> None:
        self.n_examples = 0
        self.dims = None if dims is None else dict(dims)
        self._sums: dict[str, list[torch.Tensor]] = {}

    def state(self) -> AccumulatorState:
        """``(n_examples, dims, {layer: [float64 sums on the CPU]})``: all a fit has accumulated so far."""
        return self.n_examples, self.dims, {name: [t.detach().cpu() for t in terms] for name, terms in self._sums.items()}

    def load_states(self, states: Sequence[AccumulatorState]) -> None:
        """Replace the accumulated sums by the sum of ``states`` (e.g. one per rank), added in order.

        Adding in a fixed order gives every process the same bits. The sums stay
        on the device of this fitter's own sums (CPU when it has none).
        """
        device = next((t.device for terms in self._sums.values() for t in terms), torch.device("cpu"))
        total, dims, sums = 0, self.dims, {}
        for n, state_dims, state_sums in states:
            total += n
            dims = state_dims if dims is None else dims
            for name, terms in state_sums.items():
                if name not in sums:
                    sums[name] = [t.to(device, copy=True) for t in terms]
                else:
                    for acc, t in zip(sums[name], terms):
                        acc += t.to(device)
        self.n_examples, self.dims, self._sums = total, dims, sums

    def save_state(self, path: str | os.PathLike) -> None:
        """Write :meth:`state` to a safetensors file, atomically (temp file + rename).

        Tensors ``<layer>/<i>`` hold the float64 sums; the metadata holds the example
        count and the layers' (k_out, k_in).
        """
        n, dims, sums = self.state()
        tensors = {f"{name}/{i}": t.contiguous() for name, terms in sums.items() for i, t in enumerate(terms)}
        meta = {STATE_KEY: json.dumps({"n_examples": n, "dims": dims, "terms": {k: len(v) for k, v in sums.items()}})}
        tmp = f"{os.fspath(path)}.{os.getpid()}.tmp"
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @staticmethod
    def read_state(path: str | os.PathLike) -> AccumulatorState:
        """A state written by :meth:`save_state`.

        Raises:
            ValueError: the file is unreadable or not such a state (names the file).
        """
        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                info = json.loads((f.metadata() or {})[STATE_KEY])
                n, dims = int(info["n_examples"]), {k: tuple(v) for k, v in info["dims"].items()}
                sums = {name: [f.get_tensor(f"{name}/{i}") for i in range(count)]
                        for name, count in info["terms"].items()}
        except (SafetensorError, OSError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable fitter state ({type(exc).__name__}: {exc})") from None
        if set(sums) != set(dims) or any(t.dtype != F64 for terms in sums.values() for t in terms):
            raise ValueError(f"{path}: not a fitter state (layers or dtypes do not match its metadata)")
        return n, dims, sums

    def _register(self, dims: Mapping[str, Dims]) -> None:
        if self.dims is None:
            self.dims = dict(dims)
            return
        if set(dims) != set(self.dims):
            raise ValueError(f"every batch must have the layers {sorted(self.dims)}, got {sorted(dims)}")
        for name, d in dims.items():
            if d != self.dims[name]:
                raise ValueError(f"layer {name!r}: (k_out, k_in) = {d} differs from the expected {self.dims[name]}")

    def _add(self, name: str, *terms: torch.Tensor) -> None:
        if name not in self._sums:
            self._sums[name] = list(terms)
        else:
            for total, term in zip(self._sums[name], terms):
                total += term.to(total.device)

    def _means(self) -> dict[str, list[torch.Tensor]]:
        if self.n_examples == 0:
            raise ValueError("no examples seen: call update(...) with at least one non-empty batch before finalize() "
                             "(from Attributor.fit: its batches yielded no examples)")
        return {name: [total / self.n_examples for total in totals] for name, totals in self._sums.items()}

    def _feature_batch(self, features: Features, dtype: torch.dtype | None = F64) -> dict[str, torch.Tensor]:
        """Validate and register one {layer: (B, k_out, k_in)} batch; count its examples.

        Returns the batch in ``dtype`` (None: float64 features stay float64, others become float32).
        """
        features = _check_features(features)
        batch = _batch_size(features)
        self._register({name: tuple(x.shape[1:]) for name, x in features.items()})
        self.n_examples += batch
        return {name: x.to(dtype or (F64 if x.dtype == F64 else torch.float32)) for name, x in features.items()}


class _FisherAccumulator(_Accumulator):
    """Σ_b vec(ĝ_b) vec(ĝ_b)ᵀ per layer, (n, n) float64 with n = k_out * k_in (memory n² × 8 bytes)."""

    def update(self, features: Features) -> None:
        """Add one batch {layer: (B, k_out, k_in)} of projected per-example gradients (any float dtype)."""
        for name, x in self._feature_batch(features).items():
            v = x.reshape(x.shape[0], -1)
            self._add(name, v.T @ v)

    def _fisher(self) -> dict[str, torch.Tensor]:
        return {name: F.reshape(*self.dims[name], *self.dims[name]) for name, (F,) in self._means().items()}


class FisherFitter(_FisherAccumulator):
    """Streams F; ``finalize()`` returns the damped Fisher inverse (:func:`damped_fisher`).

    Args:
        damping: :class:`Damping`, a number (absolute λ) or None (0.1 × mean eigenvalue of F).
    """

    def __init__(self, damping: Damping | float | None = None) -> None:
        super().__init__()
        self.damping = _as_damping(damping)

    def finalize(self) -> Curvature:
        return damped_fisher(self._fisher(), self.damping, self.n_examples)


class LowRankFitter(_FisherAccumulator):
    """Streams F; ``finalize()`` keeps its top-``rank`` eigenpairs and applies Woodbury (:func:`low_rank`).

    Args:
        rank: eigenpairs kept per layer (at most k_out * k_in).
        damping: :class:`Damping`, a number (absolute λ) or None (0.1 × mean eigenvalue of F).
    """

    def __init__(self, rank: int, damping: Damping | float | None = None) -> None:
        super().__init__()
        _check_rank(rank)
        self.rank = rank
        self.damping = _as_damping(damping)

    def finalize(self) -> Curvature:
        return low_rank(self._fisher(), self.rank, self.damping, self.n_examples)


class KFACFitter(_Accumulator):
    """Streams the Kronecker factors S_G, S_A (phase 1 of EK-FAC); ``finalize()`` returns K-FAC.

    Args:
        damping: :class:`Damping`, a number (absolute λ) or None (0.1 × mean of e_G e_Aᵀ).

    Attributes:
        float32_products: some of the sums come from float32 products (set by :meth:`update`; set it
            when loading sums of float32 tokens with :meth:`load_states`): the PSD check then
            allows float32 round-off (``PSD_TOL_FLOAT32``).
    """

    def __init__(self, damping: Damping | float | None = None) -> None:
        super().__init__()
        self.damping = _as_damping(damping)
        self.float32_products = False

    def update(self, activations: Features, gradients: Features, mask: torch.Tensor | None = None) -> None:
        """Add one batch of token-level projected activations and output-gradients.

        Args:
            activations: {layer: (B, T, k_in)} a = A P_in, any float dtype.
            gradients: {layer: (B, T, k_out)} g = G P_out, same layers and (B, T).
            mask: optional (B, T) token mask as in ``project_factored``: weights m multiply g,
                tokens with m = 0 are dropped from S_A too. B counts towards N, T does not.

        A batch's products run in the tokens' precision (float32 unless they are float64) over
        the tokens that are nonzero in a or g (padding adds nothing, so it costs nothing); the
        sums accumulate in float64.
        """
        _check_tokens(activations, gradients, mask)
        batch = _batch_size(activations)
        self._register({name: (gradients[name].shape[2], a.shape[2]) for name, a in activations.items()})
        for name, a in activations.items():
            g = gradients[name]
            dtype = F64 if F64 in (a.dtype, g.dtype) else torch.float32
            self.float32_products |= dtype == torch.float32
            a, g = a.to(dtype), g.to(dtype)
            if mask is not None:
                m = mask.to(a.device, dtype)[..., None]
                a, g = a * (m != 0), g * m
            a, g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
            live = (a != 0).any(1) | (g != 0).any(1)
            if not bool(live.all()):
                a, g = a[live], g[live]
            self._add(name, (g.T @ g).to(F64), (a.T @ a).to(F64))
        self.n_examples += batch

    def finalize(self) -> Curvature:
        return kfac({name: tuple(pair) for name, pair in self._means().items()}, self.damping, self.n_examples,
                    PSD_TOL_FLOAT32 if self.float32_products else PSD_TOL)


class EKFACFitter(_Accumulator):
    """Phase 2 of EK-FAC: streams Λ = (1/N) Σ_b (Q_Gᵀ ĝ_b Q_A)² in the eigenbases of a fitted K-FAC.

    Args:
        eigenbases: the K-FAC from phase 1 (``KFACFitter(...).finalize()`` or ``Curvature.load``).
        damping: :class:`Damping`, a number (absolute λ) or None (0.1 × mean of Λ).
    """

    def __init__(self, eigenbases: Curvature, damping: Damping | float | None = None) -> None:
        self._bases = _eigenbases(eigenbases)
        super().__init__(eigenbases.dims)
        self.eigenbases = eigenbases
        self.damping = _as_damping(damping)

    def update(self, features: Features) -> None:
        """Add one batch {layer: (B, k_out, k_in)} of projected per-example gradients, every layer.

        The rotation runs in the features' precision (float32 unless they are float64, as the
        store holds them); the squares are summed over examples in float64.
        """
        for name, x in self._feature_batch(features, dtype=None).items():
            base = self._bases[name]
            rotated = base.eigvecs_G.to(x.device, x.dtype).T @ x @ base.eigvecs_A.to(x.device, x.dtype)
            self._add(name, rotated.square().sum(0, dtype=F64))

    def finalize(self) -> Curvature:
        corrections = {name: Lam for name, (Lam,) in self._means().items()}
        return ekfac(self.eigenbases, corrections, self.damping, self.n_examples)
