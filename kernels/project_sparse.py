"""Sparse Johnson-Lindenstrauss projection by an implicit matrix hashed inside the kernel."""

import math

import torch
import triton
import triton.language as tl

from airtrace.kernels.hash import col_key, mix32, row_key
from airtrace.ops.backends import dtype_code
from airtrace.ops.hash import seed_key


@triton.jit
def _project_sparse_kernel(X, out, B, p, k, stride_x, skey, row_offset, scale, S: tl.constexpr,
                           BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr):
    """out[b, col_j(r)] += scale sign_j(r) X[b, i], r = row_offset + i, j < S (hash.h "sparse"), atomically."""
    pid_p = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_i = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = (offs_b < B)[:, None] & (offs_i < p)[None, :]
    x = tl.load(X + offs_b.to(tl.int64)[:, None] * stride_x + offs_i[None, :], mask=mask, other=0.0).to(tl.float32)
    rkey = row_key(skey, row_offset + offs_i)
    rows = offs_b.to(tl.int64)[:, None] * k
    for j in tl.static_range(S):
        bits = mix32(rkey ^ col_key(tl.full((BLOCK_P,), j, tl.uint32)))
        start = j * k // S
        size = (j + 1) * k // S - start
        column = start + (((bits & 0x7FFFFFFF).to(tl.int64) * size) >> 31)
        sign = 1.0 - 2.0 * (bits >> 31).to(tl.float32)
        tl.atomic_add(out + rows + column[None, :], x * (sign * scale)[None, :], mask=mask)


def project_sparse(X: torch.Tensor, k: int, s: int, seed: int, row_offset: int, out: torch.Tensor) -> torch.Tensor:
    """Accumulate ``out (B, k) float32 += X (B, p) @ R[row_offset : row_offset + p]``, R sparse and hashed.

    Row r of R has s nonzeros ``±1/sqrt(s)`` (``airtrace.ops.hash.sparse_entries``); ``X`` is
    float32/bfloat16/float16 with ``X.stride(1) == 1``. Programs own (BLOCK_B x BLOCK_P) tiles of X
    and add into ``out`` atomically.
    """
    dtype_code(X, "X", "triton")
    B, p = X.shape
    block_b = min(max(triton.next_power_of_2(B), 1), 16)
    block_p = 128
    grid = (triton.cdiv(p, block_p), triton.cdiv(B, block_b))
    _project_sparse_kernel[grid](
        X, out, B, p, k, X.stride(0), int(seed_key(seed)), row_offset, 1.0 / math.sqrt(s), S=s,
        BLOCK_B=block_b, BLOCK_P=block_p, num_warps=4,
    )
    return out
