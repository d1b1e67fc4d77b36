"""The op precondition (K-FAC / EK-FAC inverse curvature in a Kronecker eigenbasis, per sample): checks, float64
reference, compiled/Triton dispatch and ``torch.ops.airtrace.precondition``; imports ``airtrace.ops.backends``,
``airtrace.util`` and its kernels."""

from __future__ import annotations

import math
import numbers

import torch

from airtrace.ops import backends
from airtrace.ops.backends import accumulation_dtype
from airtrace.util.checks import all_finite, check_same_device, check_tensor


def precondition(
    G_hat: torch.Tensor,
    Q_G: torch.Tensor,
    Q_A: torch.Tensor,
    Lam: torch.Tensor,
    damping: float,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """K-FAC / EK-FAC inverse curvature in a Kronecker eigenbasis, applied per sample.

    ``out[b] = Q_G [(Q_Gᵀ Ĝ_b Q_A) / (Λ + λ)] Q_Aᵀ``, i.e. ``(Q diag(vec Λ) Qᵀ + λI)⁻¹ vec(Ĝ_b)``
    with ``Q = kron(Q_G, Q_A)`` (row-major vec) when Q_G and Q_A are orthonormal. The kernels
    fuse the four products per sample: the rotated intermediate never reaches global memory.

    Args:
        G_hat: (B, k_out, k_in) projected per-sample gradients, float32/bfloat16/float16
            (float64: torch backend, which "auto" picks for float64).
        Q_G: (k_out, k_out) eigenvectors (columns) of the output-side factor.
        Q_A: (k_in, k_in) eigenvectors (columns) of the input-side factor.
        Lam: (k_out, k_in) eigenvalues in the basis ``kron(Q_G, Q_A)``.
        damping: λ, finite and >= 0; ``Lam + damping`` must be > 0 elementwise.
        backend: "auto", "torch", "cpu", "cuda" or "triton". For float64 G_hat "auto"
            means "torch" (the compiled kernels accumulate in fp32), even when
            $AIRTRACE_BACKEND is set.

    Returns:
        (B, k_out, k_in) float32 (float64 for float64 G_hat). Q_G, Q_A and Lam are
        used in that dtype; accumulation is fp32 on the compiled backends. Meta tensors
        give a meta result.

    Raises:
        ValueError: bad shapes, ``Lam + damping`` not > 0, NaN/Inf inputs, or a result that
            is not finite: ``Lam + damping`` so close to 0 that ``1 / (Lam + damping)`` overflows
            the accumulation dtype (never returned as inf).
    """
    check_tensor("G_hat", G_hat, 3)
    check_tensor("Q_G", Q_G, 2)
    check_tensor("Q_A", Q_A, 2)
    check_tensor("Lam", Lam, 2)
    B, k_out, k_in = G_hat.shape
    for name, t, want in (("Q_G", Q_G, (k_out, k_out)), ("Q_A", Q_A, (k_in, k_in)), ("Lam", Lam, (k_out, k_in))):
        if tuple(t.shape) != want:
            raise ValueError(
                f"{name} must be {want} for G_hat (B, k_out, k_in) = {tuple(G_hat.shape)}, got shape {tuple(t.shape)}"
            )
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real) or not math.isfinite(damping) or damping < 0:
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    damping = float(damping)
    device = check_same_device(G_hat=G_hat, Q_G=Q_G, Q_A=Q_A, Lam=Lam)
    acc = accumulation_dtype(G_hat.dtype)
    if device.type == "meta":
        return fake(G_hat, Q_G, Q_A, Lam, damping)
    for name, t in (("G_hat", G_hat), ("Q_G", Q_G), ("Q_A", Q_A)):
        if t.numel() and not all_finite(t):
            raise ValueError(f"precondition: {name} has NaN/Inf values")
    Lam = Lam.to(acc)
    denominator = Lam + damping
    if not bool((denominator > 0).all()):
        bad = ~(denominator > 0)
        raise ValueError(
            f"Lam + damping must be > 0 elementwise, got {int(bad.sum())} of {Lam.numel()} entries <= 0 or NaN "
            f"(min Lam = {Lam.min().item():.6g}, damping = {damping:.6g}); eigenvalues must be >= 0 (clamp "
            "round-off negatives) and damping > 0 where an eigenvalue is 0"
        )
    if G_hat.numel() == 0:
        return torch.zeros(B, k_out, k_in, dtype=acc, device=device)
    run = IMPLEMENTATIONS[backends.choose("precondition", backend, device, G_hat.dtype)]
    out = run(G_hat.contiguous(), Q_G.to(acc).contiguous(), Q_A.to(acc).contiguous(), Lam.contiguous(), damping)
    if not all_finite(out):
        raise ValueError(
            f"precondition: the result overflows {acc} (NaN/Inf): min(Lam + damping) = {denominator.min().item():.6g} "
            f"is too close to 0 for G_hat of magnitude up to {G_hat.abs().max().item():.6g}. Fix: raise damping "
            "(an eigenvalue near 0 needs damping to bound 1 / (Lam + damping))")
    return out


def reference(
    G_hat: torch.Tensor, Q_G: torch.Tensor, Q_A: torch.Tensor, Lam: torch.Tensor, damping: float
) -> torch.Tensor:
    """Backend "torch": out[b] = Q_G [(Q_Gᵀ Ĝ_b Q_A) / (Λ + λ)] Q_Aᵀ, shape (B, k_out, k_in).

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


def _compiled(backend: str, G_hat, Q_G, Q_A, Lam, damping):
    """Backends "cpu" / "cuda": the C++ / CUDA kernel (csrc/*/precondition.*) on raw pointers."""
    lib, stream = backends.library(backend)
    code = backends.dtype_code(G_hat, "G_hat", backend)
    B, k_out, k_in = G_hat.shape
    Q_G, Q_A, Lam = (t.float().contiguous() for t in (Q_G, Q_A, Lam))
    out = torch.empty(B, k_out, k_in, dtype=torch.float32, device=G_hat.device)
    lib.precondition(
        G_hat.data_ptr(), code, Q_G.data_ptr(), Q_A.data_ptr(), Lam.data_ptr(), float(damping),
        B, k_out, k_in, out.data_ptr(), stream(G_hat.device),
    )
    return out


def _triton(*args):
    """Backend "triton": kernels/precondition.py (Triton is optional, so it is imported on use)."""
    from airtrace.kernels.precondition import precondition as kernel

    return kernel(*args)


def fake(G_hat, Q_G, Q_A, Lam, damping, backend="auto"):
    """The result's shape, dtype and device without computing it (meta and fake tensors)."""
    return G_hat.new_empty(G_hat.shape, dtype=accumulation_dtype(G_hat.dtype))


IMPLEMENTATIONS = backends.implementations(reference, _compiled, _triton)


@torch.library.custom_op("airtrace::precondition", mutates_args=())
def torch_op(G_hat: torch.Tensor, Q_G: torch.Tensor, Q_A: torch.Tensor, Lam: torch.Tensor, damping: float,
             backend: str = "auto") -> torch.Tensor:
    """``out[b] = Q_G [(Q_G^T G_hat[b] Q_A) / (Lam + damping)] Q_A^T``: (B, k_out, k_in) -> (B, k_out, k_in).

    See :func:`precondition`.
    """
    return precondition(G_hat, Q_G, Q_A, Lam, damping, backend=backend)


torch_op.register_fake(fake)
