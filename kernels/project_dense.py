"""Dense projection by an implicit random matrix generated inside the kernel (TRAK)."""

import math

import torch
import triton
import triton.language as tl

from airtrace.ops.backends import dtype_code
from airtrace.kernels.hash import box_muller, col_key, mix32, rademacher, row_key
from airtrace.ops.hash import seed_key

PROGRAMS = 512  # split p until about this many programs run: fills a GPU several times over


@triton.jit
def _project_dense_kernel(
    X, part, B, p, k, stride_x, skey, row_offset, scale, rows_per_split, GAUSSIAN: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """part[s, b, c] = scale sum_{i in split s} X[b, i] E[row_offset + i, c], E = hash entries (+-1 or N(0, 1))."""
    pid_k = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_s = tl.program_id(2).to(tl.int64)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = 2 * (pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2))  # even columns; odd ones are cols + 1
    ckey_even = col_key(cols.to(tl.uint32))[None, :]
    ckey_odd = col_key((cols + 1).to(tl.uint32))[None, :]
    x_rows = X + offs_b.to(tl.int64)[:, None] * stride_x
    first = pid_s * rows_per_split
    acc_even = tl.zeros((BLOCK_B, BLOCK_K // 2), dtype=tl.float32)
    acc_odd = tl.zeros((BLOCK_B, BLOCK_K // 2), dtype=tl.float32)
    for i0 in range(0, rows_per_split, BLOCK_P):
        offs_i = first + i0 + tl.arange(0, BLOCK_P)
        x = tl.load(x_rows + offs_i[None, :], mask=(offs_b < B)[:, None] & (offs_i < p)[None, :], other=0.0)
        x = x.to(tl.float32)
        rkey = row_key(skey, row_offset + offs_i)[:, None]
        bits_even = mix32(rkey ^ ckey_even)
        bits_odd = mix32(rkey ^ ckey_odd)
        if GAUSSIAN:  # columns 2j and 2j + 1 share one Box-Muller pair
            e_even, e_odd = box_muller(bits_even, bits_odd)
        else:
            e_even, e_odd = rademacher(bits_even), rademacher(bits_odd)
        acc_even = tl.dot(x, e_even, acc_even, input_precision=PRECISION)
        acc_odd = tl.dot(x, e_odd, acc_odd, input_precision=PRECISION)
    out = part + (pid_s * B + offs_b[:, None]) * k + cols[None, :]
    b_mask = (offs_b < B)[:, None]
    tl.store(out, acc_even * scale, mask=b_mask & (cols < k)[None, :])
    tl.store(out + 1, acc_odd * scale, mask=b_mask & (cols + 1 < k)[None, :])


def project_dense(X: torch.Tensor, k: int, seed: int, kind: str, row_offset: int, out: torch.Tensor) -> torch.Tensor:
    """Accumulate ``out (B, k) float32 += X (B, p) @ R[row_offset : row_offset + p]``.

    ``R[r, c]`` is the counter-based hash entry of (seed, r, c) scaled by
    1/sqrt(k); ``X`` is float32/bfloat16/float16 with ``X.stride(1) == 1``.
    Row blocks of p are split over programs and their partial sums added here.
    """
    dtype_code(X, "X", "triton")
    B, p = X.shape
    block_b = min(max(triton.next_power_of_2(B), 16), 32)
    block_k = min(max(triton.next_power_of_2(k), 32), 64)
    block_p = 32
    tiles = triton.cdiv(k, block_k) * triton.cdiv(B, block_b)
    splits = max(1, min(triton.cdiv(p, block_p), PROGRAMS // tiles))
    rows_per_split = triton.cdiv(triton.cdiv(p, splits), block_p) * block_p
    splits = triton.cdiv(p, rows_per_split)
    part = torch.empty(splits, B, k, dtype=torch.float32, device=X.device)
    # +-1 and 16-bit floats are exact in tf32, so one tf32 product is exact; otherwise split into 3.
    precision = "tf32" if kind == "rademacher" and X.dtype != torch.float32 else "tf32x3"
    grid = (triton.cdiv(k, block_k), triton.cdiv(B, block_b), splits)
    _project_dense_kernel[grid](
        X, part, B, p, k, X.stride(0), int(seed_key(seed)), row_offset, 1.0 / math.sqrt(k), rows_per_split,
        GAUSSIAN=kind == "gaussian", PRECISION=precision, BLOCK_B=block_b, BLOCK_P=block_p, BLOCK_K=block_k,
        num_warps=8,
    )
    out += part.sum(0)
    return out
