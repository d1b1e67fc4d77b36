"""Reference attention pooling of training groups (AirRep group scores)."""

from __future__ import annotations

import torch

from airtrace.ref.project import accumulation_dtype


def _group_tiles(offsets: list[int], tile: int) -> list[tuple[int, int]]:
    """Cut groups 0..G-1 into ranges [g0, g1) of whole groups with about ``tile`` members each."""
    ranges, g0 = [], 0
    G = len(offsets) - 1
    while g0 < G:
        g1 = g0 + 1
        while g1 < G and offsets[g1 + 1] - offsets[g0] <= tile:
            g1 += 1
        ranges.append((g0, g1))
        g0 = g1
    return ranges


def group_pool_scores(
    queries: torch.Tensor,
    train: torch.Tensor,
    offsets: torch.Tensor,
    members: torch.Tensor,
    tile: int = 8192,
) -> torch.Tensor:
    """f[x, g] = sum_{i in S_g} softmax_{i in S_g}(|s_i|) s_i with s_i = queries[x] . train[i]; 0 for empty S_g.

    Groups are processed in ranges of whole groups holding about ``tile`` members: the
    member rows of a range are gathered, scored against all queries, and pooled with a
    segmented max-subtracted softmax (scatter max, exp, scatter sums), so memory is
    O(q * max(tile, largest group)) and the (q, n) score matrix is never formed. A NaN or
    infinite score makes its group's result NaN.

    Args:
        queries: (q, d) query embeddings.
        train: (n, d) training embeddings.
        offsets: (G + 1,) int64, group g's members are ``members[offsets[g]:offsets[g + 1]]``.
        members: (nnz,) int64 row indices into ``train`` (groups may overlap or repeat rows).
        tile: members per gathered range (a larger group forms a range of its own).

    Returns:
        (q, G) float32, float64 when either input is float64.
    """
    acc = accumulation_dtype(torch.promote_types(queries.dtype, train.dtype))
    Q = queries.to(acc)
    q, G = Q.shape[0], offsets.shape[0] - 1
    out = torch.zeros(q, G, dtype=acc, device=Q.device)
    bounds = offsets.tolist()
    sizes = offsets.diff()
    group_of = torch.repeat_interleave(torch.arange(G, device=offsets.device), sizes)  # (nnz,)
    for g0, g1 in _group_tiles(bounds, tile):
        p0, p1 = bounds[g0], bounds[g1]
        if p0 == p1:
            continue
        s = Q @ train[members[p0:p1]].to(acc).T  # (q, m)
        segment = (group_of[p0:p1] - g0).to(Q.device).expand(q, -1)
        a = s.abs()
        peak = torch.full((q, g1 - g0), float("-inf"), dtype=acc, device=Q.device)
        peak = peak.scatter_reduce(1, segment, a, reduce="amax")
        e = torch.exp(a - peak.gather(1, segment))
        den = torch.zeros_like(peak).scatter_add_(1, segment, e)
        num = torch.zeros_like(peak).scatter_add_(1, segment, e * s)
        out[:, g0:g1] = num / den.clamp_min(1.0)  # den >= 1 (exp(0) at the peak); 0 / 1 when empty
    return out
