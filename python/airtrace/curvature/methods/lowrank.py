"""Curvature method "lowrank": the top-r eigenpairs of the Fisher plus damping, applied by Woodbury, and its streaming
fitter; imports ``airtrace.curvature.fitted``, ``.fitting`` and ``airtrace.curvature.methods.fisher``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from airtrace.curvature.methods.fisher import FisherAccumulator
from airtrace.curvature.fitted import Curvature, LayerInverse, TensorReader
from airtrace.curvature.fitting import Damping, Dims, Features, as_damping, check_mapping, check_rank, eigh, fisher_matrix


@dataclass(frozen=True)
class LowRankInverse(LayerInverse, methods=("lowrank",)):
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
    check_mapping("fisher", fisher)
    check_rank(rank)
    damping = as_damping(damping)
    inverses = {}
    for name, F in fisher.items():
        M, dims = fisher_matrix(name, F)
        eigenvalues, eigvecs = eigh(name, "Fisher", M)
        lam = damping.resolve(name, float(eigenvalues.mean()), "lowrank")
        r = min(rank, M.shape[0])
        inverses[name] = LowRankInverse(dims, lam, eigvecs[:, -r:].contiguous(), eigenvalues[-r:].contiguous())
    return Curvature("lowrank", inverses, damping.factor_for("lowrank"), n_examples, damping.record("lowrank"))


class LowRankFitter(FisherAccumulator):
    """Streams F; ``finalize()`` keeps its top-``rank`` eigenpairs and applies Woodbury (:func:`low_rank`).

    Args:
        rank: eigenpairs kept per layer (at most k_out * k_in).
        damping: :class:`Damping`, a number (absolute λ) or None (the method's fixed factor × mean eigenvalue of F).
    """

    def __init__(self, rank: int, damping: Damping | float | None = None) -> None:
        super().__init__()
        check_rank(rank)
        self.rank = rank
        self.damping = as_damping(damping)

    def finalize(self) -> Curvature:
        return low_rank(self._fisher(), self.rank, self.damping, self.n_examples)
