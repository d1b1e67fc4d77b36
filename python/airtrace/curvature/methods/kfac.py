"""Curvature method "kfac": ``(S_G ⊗ S_A + λI)⁻¹`` per layer in the eigenbases of the two Kronecker factors (applied by
the ``precondition`` op), and its streaming fitter; imports ``airtrace.curvature.fitted``, ``.fitting`` and the
kernels layer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from airtrace.curvature.fitted import Curvature, LayerInverse, TensorReader
from airtrace.curvature.fitting import (
    F64,
    PSD_TOL,
    PSD_TOL_FLOAT32,
    Accumulator,
    Damping,
    Dims,
    Features,
    as_damping,
    batch_size,
    check_mapping,
    check_tokens,
    eigh,
    square,
)
from airtrace.ops.precondition import precondition


@dataclass(frozen=True)
class EigenbasisInverse(LayerInverse, methods=("kfac", "ekfac")):
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
        """Through the ``precondition`` op: float64 on its torch backend, float32 on the fused kernel."""
        Q_G, Q_A, Lam = (t.to(features.device, features.dtype) for t in (self.eigvecs_G, self.eigvecs_A, self.eigenvalues))
        return precondition(features, Q_G, Q_A, Lam, self.damping)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"eigvecs_G": self.eigvecs_G, "eigvecs_A": self.eigvecs_A, "eigenvalues": self.eigenvalues}

    @classmethod
    def from_tensors(cls, dims: Dims, damping: float, take: TensorReader) -> EigenbasisInverse:
        k_out, k_in = dims
        return cls(
            dims, damping, take("eigvecs_G", (k_out, k_out)), take("eigvecs_A", (k_in, k_in)), take("eigenvalues", dims)
        )


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
    check_mapping("factors", factors)
    damping = as_damping(damping)
    inverses = {}
    for name, pair in factors.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"layer {name!r}: factors must be a pair (S_G, S_A), got {type(pair).__name__}")
        e_G, Q_G = eigh(name, "S_G", square(name, "S_G", pair[0]), psd_tol)
        e_A, Q_A = eigh(name, "S_A", square(name, "S_A", pair[1]), psd_tol)
        eigenvalues = torch.outer(e_G, e_A)
        lam = damping.resolve(name, float(eigenvalues.mean()), "kfac")
        inverses[name] = EigenbasisInverse((len(e_G), len(e_A)), lam, Q_G, Q_A, eigenvalues)
    return Curvature("kfac", inverses, damping.factor_for("kfac"), n_examples, damping.record("kfac"))


class KFACFitter(Accumulator):
    """Streams the Kronecker factors S_G, S_A (phase 1 of EK-FAC); ``finalize()`` returns K-FAC.

    Args:
        damping: :class:`Damping`, a number (absolute λ) or None (the method's fixed factor × mean of e_G e_Aᵀ).

    Attributes:
        float32_products: some of the sums come from float32 products (set by :meth:`update`; set it
            when loading sums of float32 tokens with :meth:`load_states`): the PSD check then
            allows float32 round-off (``PSD_TOL_FLOAT32``).
    """

    def __init__(self, damping: Damping | float | None = None) -> None:
        super().__init__()
        self.damping = as_damping(damping)
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
        check_tokens(activations, gradients, mask)
        batch = batch_size(activations)
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
