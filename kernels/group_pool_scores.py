"""Attention pooling of training groups (AirRep group scores), one pass, no (q, n) matrix."""

import torch
import triton
import triton.language as tl

from airtrace.ops.backends import dtype_code

MAX_QUERY_BLOCKS = 65535  # grid axis 1 limit


@triton.jit
def _group_pool_scores_kernel(
    Q, X, offsets, members, out, q, d, G,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[x, g] = sum_{i in S_g} softmax_{i in S_g}(|s_i|) s_i with s_i = Q_x . X_i (0 for an empty S_g).

    Program (g, b) walks group g's members BLOCK_M at a time, scores them against
    queries [b BLOCK_Q, (b + 1) BLOCK_Q) with tl.dot, and folds them into a running
    softmax per query: peak = max |s|, den = sum exp(|s| - peak), num = sum exp(|s| - peak) s.
    """
    g = tl.program_id(0)
    offs_q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_rows = Q + offs_q.to(tl.int64)[:, None] * d
    begin = tl.load(offsets + g)
    end = tl.load(offsets + g + 1)
    peak = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    den = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    num = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    for p0 in range(begin, end, BLOCK_M):
        offs_m = p0 + tl.arange(0, BLOCK_M)
        valid = offs_m < end
        rows = tl.load(members + offs_m, mask=valid, other=0)
        x_rows = X + rows.to(tl.int64)[:, None] * d
        s = tl.zeros((BLOCK_Q, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            qv = tl.load(q_rows + offs_k[None, :], mask=(offs_q < q)[:, None] & (offs_k < d)[None, :], other=0.0)
            xv = tl.load(x_rows + offs_k[None, :], mask=valid[:, None] & (offs_k < d)[None, :], other=0.0)
            s = tl.dot(qv, tl.trans(xv.to(tl.float32)), s, input_precision="tf32x3")
        a = tl.where(valid[None, :], tl.abs(s), float("-inf"))
        new_peak = tl.maximum(peak, tl.max(a, axis=1))  # finite: the tile holds a member
        scale = tl.exp(peak - new_peak)  # 0 while peak = -inf
        e = tl.exp(a - new_peak[:, None])  # 0 past the group's end
        den = den * scale + tl.sum(e, axis=1)
        num = num * scale + tl.sum(e * s, axis=1)
        peak = new_peak
    # A non-empty group has den >= 1 (its largest |s| contributes exp(0)); an empty one 0 / 1.
    tl.store(out + offs_q.to(tl.int64) * G + g, num / tl.maximum(den, 1.0), mask=offs_q < q)


def group_pool_scores(
    queries: torch.Tensor, train: torch.Tensor, offsets: torch.Tensor, members: torch.Tensor
) -> torch.Tensor:
    """``f[x, g] = sum_{i in S_g} softmax_{i in S_g}(|queries_x . train_i|) queries_x . train_i``; 0 for an empty S_g.

    queries (q, d) float32, train (n, d) float32/bfloat16/float16, offsets (G + 1,) and
    members (nnz,) int64 (CSR groups, already validated). One program per (group, block
    of queries); only member dot products are computed.

    Returns:
        (q, G) float32.
    """
    dtype_code(train, "train", "triton")
    queries = queries.to(torch.float32).contiguous()
    q, d = queries.shape
    G = offsets.shape[0] - 1
    block_q = max(16, min(64, triton.next_power_of_2(q)))
    query_blocks = triton.cdiv(q, block_q)
    if query_blocks > MAX_QUERY_BLOCKS:
        raise ValueError(f"queries has {q} rows; backend 'triton' takes at most {MAX_QUERY_BLOCKS * block_q} per call")
    out = torch.empty(q, G, dtype=torch.float32, device=queries.device)
    _group_pool_scores_kernel[(G, query_blocks)](
        queries, train, offsets, members, out, q, d, G, BLOCK_Q=block_q, BLOCK_M=32, BLOCK_K=32, num_warps=4,
    )
    return out
