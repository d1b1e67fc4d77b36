"""Streamed scoring with a running top-k: never holds more than a tile of Q X^T."""

import torch
import triton
import triton.language as tl

from airtrace.ops.backends import dtype_code
from airtrace.ops.merge_topk import NORM_EPS, combine_topk

PROGRAMS = 512  # split n until about this many programs run: fills a GPU several times over


@triton.jit
def _score_topk_kernel(
    Q, X, values, indices, q, n, k, rows_per_chunk, eps,
    NORMALIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """values, indices[i, c] = the BLOCK_N largest s[i, j] = Q_i . X_j / (max(|Q_i|, eps) max(|X_j|, eps)) in chunk c.

    (No division unless NORMALIZE.) Scores are packed into unique uint64 keys,
    orderable float bits << 32 | ~j, so key order is value descending, then
    index ascending. Each query keeps an unsorted set of its BLOCK_N best keys
    (empty slots hold the keys 0..BLOCK_N-1, below every score) and swaps its
    smallest for the tile's largest while that wins.
    """
    offs_q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    chunk = tl.program_id(1)
    q_rows = Q + offs_q.to(tl.int64)[:, None] * k
    best = tl.broadcast_to(tl.arange(0, BLOCK_N).to(tl.uint64)[None, :], (BLOCK_Q, BLOCK_N))
    for j0 in range(0, rows_per_chunk, BLOCK_N):
        offs_j = chunk * rows_per_chunk + j0 + tl.arange(0, BLOCK_N)
        x_rows = X + offs_j.to(tl.int64)[:, None] * k
        s = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
        q_sq = tl.zeros((BLOCK_Q,), dtype=tl.float64)  # float64: the square of any fp32 fits
        x_sq = tl.zeros((BLOCK_N,), dtype=tl.float64)
        for k0 in range(0, k, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            qv = tl.load(q_rows + offs_k[None, :], mask=(offs_q < q)[:, None] & (offs_k < k)[None, :], other=0.0)
            xv = tl.load(x_rows + offs_k[None, :], mask=(offs_j < n)[:, None] & (offs_k < k)[None, :], other=0.0)
            xv = xv.to(tl.float32)
            s = tl.dot(qv, tl.trans(xv), s, input_precision="tf32x3")
            if NORMALIZE:
                q_sq += tl.sum(qv.to(tl.float64) * qv.to(tl.float64), axis=1)
                x_sq += tl.sum(xv.to(tl.float64) * xv.to(tl.float64), axis=1)
        if NORMALIZE:
            inv_q = (1.0 / tl.maximum(tl.sqrt(q_sq), eps)).to(tl.float32)
            inv_x = (1.0 / tl.maximum(tl.sqrt(x_sq), eps)).to(tl.float32)
            s = s * inv_q[:, None] * inv_x[None, :]
        bits = tl.where(s == 0.0, 0.0, s).to(tl.uint32, bitcast=True)  # -0.0 ranks as +0.0
        ordered = tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)
        keys = (ordered.to(tl.uint64) << 32) | (offs_j.to(tl.uint32) ^ 0xFFFFFFFF).to(tl.uint64)
        keys = tl.where((offs_q < q)[:, None] & (offs_j < n)[None, :], keys, 0)
        top = tl.max(keys, axis=1)
        lowest = tl.min(best, axis=1)
        while tl.sum((top > lowest).to(tl.int32), axis=0) > 0:
            take = (top > lowest)[:, None]
            best = tl.where(take & (best == lowest[:, None]), top[:, None], best)
            keys = tl.where(take & (keys == top[:, None]), 0, keys)
            top = tl.max(keys, axis=1)
            lowest = tl.min(best, axis=1)
    hi = (best >> 32).to(tl.uint32)
    value = tl.where((hi >> 31) != 0, hi & 0x7FFFFFFF, hi ^ 0xFFFFFFFF).to(tl.float32, bitcast=True)
    index = (best.to(tl.uint32) ^ 0xFFFFFFFF).to(tl.int32)
    empty = hi == 0
    out = (offs_q.to(tl.int64)[:, None] * tl.num_programs(1) + chunk) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    mask = (offs_q < q)[:, None]
    tl.store(values + out, tl.where(empty, float("-inf"), value), mask=mask)
    tl.store(indices + out, tl.where(empty, -1, index), mask=mask)


def score_topk(
    Q: torch.Tensor, X: torch.Tensor, topk: int, normalize: bool, index_offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``s = Q X^T`` (cosine if ``normalize``) per query, descending, ties by lower index.

    Q (q, k) float32, X (n, k) float32/bfloat16/float16. Each program keeps a
    running top-k for a block of queries over a chunk of X; the (q, chunks, topk)
    partials are merged here. Memory is O(q * chunks * topk), independent of n.

    Returns:
        values (q, topk) float32 (-inf past n) and indices (q, topk) int64 (+ index_offset; -1 past n).
    """
    dtype_code(X, "X", "triton")
    q, k = Q.shape
    n = X.shape[0]
    if n >= 2**31:
        raise ValueError(f"X has {n} rows; backend 'triton' scores at most 2^31 - 1 per call: split X into shards")
    block_n = max(triton.next_power_of_2(topk), 32)
    block_q = max(16, min(64, 2048 // block_n, triton.next_power_of_2(q)))  # registers: best and tile keys
    block_k = 32
    q_blocks = triton.cdiv(q, block_q)
    chunks = max(1, min(triton.cdiv(n, block_n), PROGRAMS // q_blocks))
    rows_per_chunk = triton.cdiv(triton.cdiv(n, chunks), block_n) * block_n
    chunks = triton.cdiv(n, rows_per_chunk)
    values = torch.empty(q, chunks * block_n, dtype=torch.float32, device=Q.device)
    indices = torch.empty(q, chunks * block_n, dtype=torch.int32, device=Q.device)
    _score_topk_kernel[(q_blocks, chunks)](
        Q, X, values, indices, q, n, k, rows_per_chunk, NORM_EPS,
        NORMALIZE=normalize, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8,
    )
    indices = indices.to(torch.int64)
    indices = torch.where(indices < 0, indices, indices + index_offset)
    return combine_topk([values], [indices], topk)
