"""Curvature method "fisher": the damped Fisher ``(F + λI)⁻¹`` per layer by a float64 Cholesky factorisation, and its
streaming fitter; imports ``airtrace.curvature.fitted`` and ``.fitting``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from airtrace.curvature.fitted import Curvature, LayerInverse, TensorReader
from airtrace.curvature.fitting import F64, Accumulator, Damping, Dims, Features, as_damping, check_mapping, fisher_matrix


@dataclass(frozen=True)
class CholeskyInverse(LayerInverse, methods=("fisher",)):
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


def damped_fisher(
    fisher: Features, damping: Damping | float | None = None, n_examples: int | None = None
) -> Curvature:
    """``(F + λI)⁻¹`` per layer by a float64 Cholesky factorisation.

    Args:
        fisher: {layer: (k_out, k_in, k_out, k_in)} F[i, j, k, l] = mean over examples of ĝ[i, j] ĝ[k, l]
            (symmetrised); λ relative to its mean eigenvalue trace(F) / n.
        damping: :class:`Damping`, a number (absolute λ) or None (the method's fixed factor × mean eigenvalue).
        n_examples: recorded in the metadata.

    Raises:
        ValueError: NaN/Inf, wrong shape, or a failed Cholesky (naming the layer; increase damping).
    """
    check_mapping("fisher", fisher)
    damping = as_damping(damping)
    inverses = {}
    for name, F in fisher.items():
        M, dims = fisher_matrix(name, F)
        n = M.shape[0]
        lam = damping.resolve(name, float(M.diagonal().mean()), "fisher")
        L, info = torch.linalg.cholesky_ex(M + lam * torch.eye(n, dtype=F64, device=M.device))
        if int(info) != 0:
            raise ValueError(
                f"layer {name!r}: Cholesky of F + λI failed (λ = {lam:.6g}, leading minor {int(info)} of {n} is not "
                "positive definite): F is not positive semi-definite or λ is too small for float64; increase the "
                "damping (a larger Damping(factor=...) or Damping(value=...))"
            )
        inverses[name] = CholeskyInverse(dims, lam, L)
    return Curvature("fisher", inverses, damping.factor_for("fisher"), n_examples, damping.record("fisher"))


class FisherAccumulator(Accumulator):
    """Σ_b vec(ĝ_b) vec(ĝ_b)ᵀ per layer, (n, n) float64 with n = k_out * k_in (memory n² × 8 bytes)."""

    def update(self, features: Features) -> None:
        """Add one batch {layer: (B, k_out, k_in)} of projected per-example gradients (any float dtype)."""
        for name, x in self._feature_batch(features).items():
            v = x.reshape(x.shape[0], -1)
            self._add(name, v.T @ v)

    def _fisher(self) -> dict[str, torch.Tensor]:
        return {name: F.reshape(*self.dims[name], *self.dims[name]) for name, (F,) in self._means().items()}


class FisherFitter(FisherAccumulator):
    """Streams F; ``finalize()`` returns the damped Fisher inverse (:func:`damped_fisher`).

    Args:
        damping: :class:`Damping`, a number (absolute λ) or None (the method's fixed factor × mean eigenvalue of F).
    """

    def __init__(self, damping: Damping | float | None = None) -> None:
        super().__init__()
        self.damping = as_damping(damping)

    def finalize(self) -> Curvature:
        return damped_fisher(self._fisher(), self.damping, self.n_examples)
