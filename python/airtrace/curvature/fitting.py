"""The fitting machinery every curvature method shares: damping, input checks, checked spectra and the streaming float64
accumulator; imports only ``airtrace.util``."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from airtrace.util.checked_file import load_checked, save_checked
from airtrace.util.checks import positive_int


F64 = torch.float64
PSD_TOL = 1e-9
PSD_TOL_FLOAT32 = 1e-5
"""PSD tolerance of K-FAC factors summed from float32 batch products (round-off near 1e-7 of the
largest eigenvalue)."""
STATE_KEY = "airtrace.fitter_state"

Dims = tuple[int, int]
Features = Mapping[str, torch.Tensor]
# (n_examples, dims, {layer: [float64 sums]}) of a streaming fitter, see Accumulator.state.
AccumulatorState = tuple[int, "dict[str, Dims] | None", "dict[str, list[torch.Tensor]]"]


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
            check_positive("Damping.value", self.value)
        check_positive("Damping.factor", self.factor)

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


def check_positive(name: str, x) -> None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {x!r}")


def check_rank(rank) -> None:
    positive_int("rank", rank)


def as_damping(damping: Damping | float | None) -> Damping:
    """None -> the default relative damping; a number -> absolute damping."""
    if damping is None:
        return Damping()
    return damping if isinstance(damping, Damping) else Damping(value=damping)


def check_finite(layer: str, what: str, t: torch.Tensor) -> None:
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(
            f"layer {layer!r}: {what} contain {bad} NaN/Inf value(s); fix the inputs "
            "(e.g. fp16 overflow, a diverged loss) before fitting or preconditioning"
        )


def check_layer_tensor(layer: str, what: str, t, shape_doc: str) -> None:
    """``t`` must be a finite floating tensor with as many dims as ``shape_doc`` names."""
    ndim = shape_doc.count(",") + 1
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"layer {layer!r}: {what} must be a torch.Tensor {shape_doc}, got {type(t).__name__}")
    if t.dim() != ndim or not t.is_floating_point():
        raise ValueError(f"layer {layer!r}: {what} must be a float tensor {shape_doc}, got {t.dtype} {tuple(t.shape)}")
    check_finite(layer, what, t)


def check_mapping(name: str, m) -> None:
    if not isinstance(m, Mapping) or not m:
        raise ValueError(f"{name} must be a non-empty dict {{layer name: tensor}}, got {type(m).__name__}")


def check_features(features: Features, dims: Mapping[str, Dims] | None = None) -> dict[str, torch.Tensor]:
    """Validate ``{layer: (B, k_out, k_in)}``; with ``dims``, layers must be known and match them."""
    check_mapping("features", features)
    for name, x in features.items():
        check_layer_tensor(name, "features", x, "(B, k_out, k_in)")
        if dims is not None:
            if name not in dims:
                raise ValueError(f"layer {name!r} is not in this curvature; its layers are {sorted(dims)}")
            if tuple(x.shape[1:]) != dims[name]:
                raise ValueError(
                    f"layer {name!r}: features must be (B, k_out, k_in) = (B, {dims[name][0]}, {dims[name][1]}), "
                    f"got {tuple(x.shape)}"
                )
    return dict(features)


def batch_size(batch: Mapping[str, torch.Tensor]) -> int:
    """The common B of every layer's tensor in one batch."""
    sizes = {name: x.shape[0] for name, x in batch.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"every layer of a batch must have the same batch size B, got {sizes}")
    return next(iter(sizes.values()))


def check_tokens(activations: Features, gradients: Features, mask: torch.Tensor | None) -> None:
    """Validate ``{layer: (B, T, k_in)}``, ``{layer: (B, T, k_out)}`` and an optional (B, T) mask."""
    check_mapping("activations", activations)
    check_mapping("gradients", gradients)
    if set(activations) != set(gradients):
        raise ValueError(
            f"activations and gradients must have the same layers, got {sorted(activations)} and {sorted(gradients)}"
        )
    for name, a in activations.items():
        g = gradients[name]
        check_layer_tensor(name, "activations", a, "(B, T, k_in)")
        check_layer_tensor(name, "gradients", g, "(B, T, k_out)")
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


def checked_spectrum(layer: str, what: str, eigenvalues: torch.Tensor, tol: float = PSD_TOL) -> torch.Tensor:
    """Reject an eigenvalue below ``-tol × max|eigenvalue|``; clamp round-off negatives to 0."""
    scale = float(eigenvalues.abs().max())
    lowest = float(eigenvalues.min())
    if lowest < -tol * scale:
        raise ValueError(
            f"layer {layer!r}: {what} is not positive semi-definite: most negative eigenvalue {lowest:.6g} "
            f"(largest |eigenvalue| {scale:.6g}); it must be an average of outer products"
        )
    return eigenvalues.clamp_min(0)


def eigh(layer: str, what: str, S: torch.Tensor, tol: float = PSD_TOL) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending, >= 0) and row-major eigenvectors (columns) of the symmetrised float64 S."""
    S = S.to(F64)
    eigenvalues, eigenvectors = torch.linalg.eigh((S + S.T) / 2)
    return checked_spectrum(layer, what, eigenvalues, tol), eigenvectors.contiguous()


def square(layer: str, what: str, S) -> torch.Tensor:
    check_layer_tensor(layer, what, S, "(n, n)")
    if S.shape[0] != S.shape[1]:
        raise ValueError(f"layer {layer!r}: {what} must be a square (n, n) matrix, got {tuple(S.shape)}")
    return S.to(F64)


def fisher_matrix(layer: str, F) -> tuple[torch.Tensor, Dims]:
    """(k_out, k_in, k_out, k_in) Fisher -> symmetrised (n, n) float64 matrix and (k_out, k_in)."""
    check_layer_tensor(layer, "Fisher", F, "(k_out, k_in, k_out, k_in)")
    if F.shape[:2] != F.shape[2:]:
        raise ValueError(f"layer {layer!r}: Fisher must be (k_out, k_in, k_out, k_in), got {tuple(F.shape)}")
    dims = (F.shape[0], F.shape[1])
    n = dims[0] * dims[1]
    M = F.to(F64).reshape(n, n)
    return (M + M.T) / 2, dims


class Accumulator:
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
        """Write :meth:`state` to a safetensors file with a checksum, atomically (temp file + rename).

        Tensors ``<layer>/<i>`` hold the float64 sums; the metadata holds the example
        count and the layers' (k_out, k_in).

        Raises:
            OSError: naming ``path`` and the cause.
        """
        n, dims, sums = self.state()
        tensors = {f"{name}/{i}": t for name, terms in sums.items() for i, t in enumerate(terms)}
        save_checked(tensors, path, STATE_KEY,
                     {"n_examples": n, "dims": dims, "terms": {k: len(v) for k, v in sums.items()}})

    @staticmethod
    def read_state(path: str | os.PathLike) -> AccumulatorState:
        """A state written by :meth:`save_state`, its checksum checked.

        Raises:
            ValueError: the file is unreadable, not such a state, or fails its checksum (names the file).
        """
        tensors, info = load_checked(path, STATE_KEY, "an airtrace fitter state")
        try:
            n, dims = int(info["n_examples"]), {k: tuple(v) for k, v in info["dims"].items()}
            sums = {name: [tensors[f"{name}/{i}"] for i in range(count)] for name, count in info["terms"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
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
        features = check_features(features)
        batch = batch_size(features)
        self._register({name: tuple(x.shape[1:]) for name, x in features.items()})
        self.n_examples += batch
        return {name: x.to(dtype or (F64 if x.dtype == F64 else torch.float32)) for name, x in features.items()}
