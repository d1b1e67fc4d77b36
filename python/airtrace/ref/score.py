"""Reference streamed scoring with a running top-k, and top-k merging."""

from __future__ import annotations

import torch

from airtrace.ref.project import accumulation_dtype

NORM_EPS = 1e-12


def _normalized(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)


def empty_topk(q: int, topk: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, topk) of -inf values and -1 indices: the padding of an unfilled top-k."""
    values = torch.full((q, topk), float("-inf"), dtype=dtype, device=device)
    indices = torch.full((q, topk), -1, dtype=torch.int64, device=device)
    return values, indices


def _order(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by value descending, equal values by lower index (-1 padding last)."""
    key = torch.where(indices < 0, torch.iinfo(torch.int64).max, indices)
    by_index = torch.argsort(key, dim=1, stable=True)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    by_value = torch.argsort(values, dim=1, descending=True, stable=True)
    return values.gather(1, by_value), indices.gather(1, by_value)


def merge_topk(
    values: list[torch.Tensor], indices: list[torch.Tensor], topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-shard top-k results (each (q, k_s)) into the overall (q, topk)."""
    v = torch.cat(values, dim=1)
    i = torch.cat(indices, dim=1)
    if v.shape[1] < topk:
        pad_v, pad_i = empty_topk(v.shape[0], topk - v.shape[1], v.dtype, v.device)
        v, i = torch.cat([v, pad_v], 1), torch.cat([i, pad_i], 1)
    v, i = _order(v, i)
    return v[:, :topk].contiguous(), i[:, :topk].contiguous()


def score_topk(
    Q: torch.Tensor,
    X: torch.Tensor,
    topk: int,
    normalize: bool = False,
    index_offset: int = 0,
    tile: int = 8192,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of s = Q X^T (cosine if ``normalize``) per query, tile by tile.

    Memory is O(q * (topk + tile)); the (q, n) matrix is never formed.
    """
    acc = accumulation_dtype(torch.promote_types(Q.dtype, X.dtype))
    Qa = Q.to(acc)
    if normalize:
        Qa = _normalized(Qa)
    values, indices = empty_topk(Q.shape[0], topk, acc, Q.device)
    for start in range(0, X.shape[0], tile):
        Xt = X[start : start + tile].to(acc)
        if normalize:
            Xt = _normalized(Xt)
        s = Qa @ Xt.T
        j = torch.arange(start, start + Xt.shape[0], device=Q.device) + index_offset
        cand_v = torch.cat([values, s], dim=1)
        cand_i = torch.cat([indices, j.expand(Q.shape[0], -1)], dim=1)
        top_v, pos = torch.topk(cand_v, min(topk, cand_v.shape[1]), dim=1)
        values, indices = top_v, cand_i.gather(1, pos)
    return _order(values, indices)
