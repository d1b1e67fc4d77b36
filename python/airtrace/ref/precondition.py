"""Reference K-FAC / EK-FAC preconditioning in a Kronecker eigenbasis."""

from __future__ import annotations

import torch

from airtrace.ref.project import accumulation_dtype


def precondition_ekfac(
    G_hat: torch.Tensor, Q_G: torch.Tensor, Q_A: torch.Tensor, Lam: torch.Tensor, damping: float
) -> torch.Tensor:
    """out[b] = Q_G [(Q_Gᵀ Ĝ_b Q_A) / (Λ + λ)] Q_Aᵀ, shape (B, k_out, k_in).

    This is ``(Q diag(vec Λ) Qᵀ + λI)⁻¹ vec(Ĝ_b)`` with ``Q = kron(Q_G, Q_A)`` and
    the row-major vec (index ``i * k_in + j``). With ``Λ = e_G e_Aᵀ`` (outer product
    of the eigenvalues of S_G and S_A) it is K-FAC's ``(S_G ⊗ S_A + λI)⁻¹``.

    Args:
        G_hat: (B, k_out, k_in) projected per-example gradients, any float dtype.
        Q_G: (k_out, k_out) orthonormal eigenvectors (columns) of the output-side factor.
        Q_A: (k_in, k_in) orthonormal eigenvectors (columns) of the input-side factor.
        Lam: (k_out, k_in) non-negative eigenvalues in the basis ``kron(Q_G, Q_A)``.
        damping: λ > 0.

    Returns:
        (B, k_out, k_in) on G_hat's device, float32 (float64 for float64 G_hat).
    """
    acc = accumulation_dtype(G_hat.dtype)
    G = G_hat.to(acc)
    Q_G, Q_A, Lam = (t.to(G.device, acc) for t in (Q_G, Q_A, Lam))
    rotated = Q_G.T @ G @ Q_A
    return Q_G @ (rotated / (Lam + damping)) @ Q_A.T
