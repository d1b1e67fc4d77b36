"""Factored (LoGra) projection of per-sample linear-layer gradients."""

import torch
import triton
import triton.language as tl

from airtrace.ops.backends import dtype_code

PROGRAMS = 512  # split T until about this many programs run: fills a GPU several times over


@triton.jit
def _project_rows(X, rows, row_mask, d, P, offs_k, k, BLOCK_D: tl.constexpr):
    """X[rows, :] @ P[:, offs_k] in fp32, for X with rows of length d and P (d, k) float32."""
    acc = tl.zeros((rows.shape[0], offs_k.shape[0]), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < d
        x = tl.load(X + rows[:, None] * d + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        p = tl.load(P + offs_d[:, None] * k + offs_k[None, :], mask=d_mask[:, None] & (offs_k < k)[None, :], other=0.0)
        acc = tl.dot(x.to(tl.float32), p, acc, input_precision="tf32x3")
    return acc


@triton.jit
def _project_factored_kernel(
    A, G, P_in, P_out, M, part, B, T, d_in, d_out, k_in, k_out, tokens_per_split, HAS_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_KI: tl.constexpr, BLOCK_KO: tl.constexpr,
):
    """part[s, b] = sum_{t in split s} m[b, t] (G[b, t] P_out)^T (A[b, t] P_in), one (k_out, k_in) tile per program."""
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    tiles_in = tl.cdiv(k_in, BLOCK_KI)
    offs_ki = (tl.program_id(2) % tiles_in) * BLOCK_KI + tl.arange(0, BLOCK_KI)
    offs_ko = (tl.program_id(2) // tiles_in) * BLOCK_KO + tl.arange(0, BLOCK_KO)
    acc = tl.zeros((BLOCK_KO, BLOCK_KI), dtype=tl.float32)
    for t0 in range(0, tokens_per_split, BLOCK_T):
        offs_t = s * tokens_per_split + t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < T
        rows = b * T + offs_t
        a_proj = _project_rows(A, rows, t_mask, d_in, P_in, offs_ki, k_in, BLOCK_D)
        g_proj = _project_rows(G, rows, t_mask, d_out, P_out, offs_ko, k_out, BLOCK_D)
        if HAS_MASK:
            g_proj *= tl.load(M + rows, mask=t_mask, other=0.0)[:, None]
        acc = tl.dot(tl.trans(g_proj), a_proj, acc, input_precision="tf32x3")
    out = part + ((s * B + b) * k_out + offs_ko[:, None]) * k_in + offs_ki[None, :]
    tl.store(out, acc, mask=(offs_ko < k_out)[:, None] & (offs_ki < k_in)[None, :])


def project_factored(
    A: torch.Tensor, G: torch.Tensor, P_in: torch.Tensor, P_out: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """``out[b] = sum_t m[b, t] (G[b, t] P_out)^T (A[b, t] P_in)``, (B, k_out, k_in) float32.

    A (B, T, d_in) and G (B, T, d_out) are float32/bfloat16/float16; P_in, P_out
    and mask (B, T) are float32. Token ranges are split over programs and their
    partial sums added here.
    """
    dtype_code(A, "A", "triton")
    B, T, d_in = A.shape
    d_out = G.shape[2]
    k_in, k_out = P_in.shape[1], P_out.shape[1]
    block_ki = min(max(triton.next_power_of_2(k_in), 16), 64)
    block_ko = min(max(triton.next_power_of_2(k_out), 16), 64)
    block_t, block_d = 32, 32
    tiles = B * triton.cdiv(k_in, block_ki) * triton.cdiv(k_out, block_ko)
    splits = max(1, min(triton.cdiv(T, block_t), PROGRAMS // tiles))
    tokens_per_split = triton.cdiv(triton.cdiv(T, splits), block_t) * block_t
    splits = triton.cdiv(T, tokens_per_split)
    part = torch.empty(splits, B, k_out, k_in, dtype=torch.float32, device=A.device)
    grid = (B, splits, triton.cdiv(k_in, block_ki) * triton.cdiv(k_out, block_ko))
    _project_factored_kernel[grid](
        A, G, P_in, P_out, mask, part, B, T, d_in, d_out, k_in, k_out, tokens_per_split,
        HAS_MASK=mask is not None, BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_KI=block_ki, BLOCK_KO=block_ko,
        num_warps=8,
    )
    return part.sum(0)
