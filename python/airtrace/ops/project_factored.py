"""The op project_factored (LoGra projection of per-sample linear-layer gradients): checks, float64 reference,
compiled/Triton dispatch and ``torch.ops.airtrace.project_factored``; imports ``airtrace.ops.backends``,
``airtrace.util`` and its kernels."""

from __future__ import annotations

from typing import Optional

import torch

from airtrace.ops import backends
from airtrace.ops.backends import accumulation_dtype
from airtrace.util.checks import check_same_device, check_tensor


def project_factored(
    A: torch.Tensor,
    G: torch.Tensor,
    P_in: torch.Tensor,
    P_out: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Factored (LoGra) projection of per-sample linear-layer gradients.

    ``out[b] = sum_t m[b,t] (G[b,t] P_out)^T (A[b,t] P_in)``, i.e. the per-sample
    weight gradient ``sum_t G_bt (x) A_bt`` projected by ``P_out^T . P_in``
    without ever forming it.

    Args:
        A: layer inputs (B, T, d_in), float32/bfloat16/float16 (float64: torch backend).
        G: gradients w.r.t. layer outputs (B, T, d_out), same dtype as A.
        P_in: (d_in, k_in) projection of the input side.
        P_out: (d_out, k_out) projection of the output side.
        mask: optional (B, T) token mask (bool or float); masked tokens contribute 0.
        backend: "auto", "torch", "cpu", "cuda" or "triton".

    Returns:
        (B, k_out, k_in) float32 (float64 for float64 inputs); meta tensors give a meta result.
    """
    check_tensor("A", A, 3)
    check_tensor("G", G, 3)
    check_tensor("P_in", P_in, 2)
    check_tensor("P_out", P_out, 2)
    if G.dtype != A.dtype:
        raise ValueError(f"G must have A's dtype {A.dtype}, got {G.dtype}")
    B, T, d_in = A.shape
    if tuple(G.shape[:2]) != (B, T):
        raise ValueError(f"G must be (B, T, d_out) with (B, T) = {(B, T)} from A, got shape {tuple(G.shape)}")
    if P_in.shape[0] != d_in or P_in.shape[1] < 1:
        raise ValueError(f"P_in must be (d_in={d_in}, k_in>=1), got shape {tuple(P_in.shape)}")
    if P_out.shape[0] != G.shape[2] or P_out.shape[1] < 1:
        raise ValueError(f"P_out must be (d_out={G.shape[2]}, k_out>=1), got shape {tuple(P_out.shape)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, T):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a (B, T) = {(B, T)} tensor, got {shape}")
    device = check_same_device(A=A, G=G, P_in=P_in, P_out=P_out, mask=mask)
    acc = accumulation_dtype(A.dtype)
    if device.type == "meta":
        return fake(A, G, P_in, P_out, mask)
    if B == 0 or T == 0:
        return torch.zeros(B, P_out.shape[1], P_in.shape[1], dtype=acc, device=device)
    run = IMPLEMENTATIONS[backends.choose("project_factored", backend, device, A.dtype)]
    mask = None if mask is None else mask.to(acc).contiguous()
    return run(A.contiguous(), G.contiguous(), P_in.to(acc).contiguous(), P_out.to(acc).contiguous(), mask)


def reference(
    A: torch.Tensor, G: torch.Tensor, P_in: torch.Tensor, P_out: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Backend "torch": out[b] = sum_t m[b,t] (G[b,t] P_out)^T (A[b,t] P_in), shape (B, k_out, k_in)."""
    acc = accumulation_dtype(A.dtype)
    a_proj = A.to(acc) @ P_in.to(acc)  # (B, T, k_in)
    g_proj = G.to(acc) @ P_out.to(acc)  # (B, T, k_out)
    if mask is not None:
        g_proj = g_proj * mask.to(acc)[:, :, None]
    return g_proj.transpose(1, 2) @ a_proj


def _compiled(backend: str, A, G, P_in, P_out, mask):
    """Backends "cpu" / "cuda": the C++ / CUDA kernel (csrc/*/project_factored.*) on raw pointers."""
    lib, stream = backends.library(backend)
    code = backends.dtype_code(A, "A", backend)
    B, T, d_in = A.shape
    d_out = G.shape[2]
    P_in, P_out = P_in.float().contiguous(), P_out.float().contiguous()
    k_in, k_out = P_in.shape[1], P_out.shape[1]
    mask = None if mask is None else mask.float().contiguous()
    out = torch.empty(B, k_out, k_in, dtype=torch.float32, device=A.device)
    lib.project_factored(
        A.data_ptr(), G.data_ptr(), code, 0 if mask is None else mask.data_ptr(),
        P_in.data_ptr(), P_out.data_ptr(), B, T, d_in, d_out, k_in, k_out,
        out.data_ptr(), stream(A.device),
    )
    return out


def _triton(*args):
    """Backend "triton": kernels/project_factored.py (Triton is optional, so it is imported on use)."""
    from airtrace.kernels.project_factored import project_factored as kernel

    return kernel(*args)


def fake(A, G, P_in, P_out, mask=None, backend="auto"):
    """The result's shape, dtype and device without computing it (meta and fake tensors)."""
    return A.new_empty((A.shape[0], P_out.shape[1], P_in.shape[1]), dtype=accumulation_dtype(A.dtype))


IMPLEMENTATIONS = backends.implementations(reference, _compiled, _triton)


@torch.library.custom_op("airtrace::project_factored", mutates_args=())
def torch_op(A: torch.Tensor, G: torch.Tensor, P_in: torch.Tensor, P_out: torch.Tensor,
             mask: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """``out[b] = sum_t m[b,t] (G[b,t] P_out)^T (A[b,t] P_in)``: (B, T, d_in), (B, T, d_out) -> (B, k_out, k_in).

    See :func:`project_factored`.
    """
    return project_factored(A, G, P_in, P_out, mask, backend=backend)


torch_op.register_fake(fake)
