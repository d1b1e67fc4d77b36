"""The op merge_topk (per-shard top-k results into one) and the top-k conventions every score_topk backend shares: empty
slots, order, the cosine eps; imports only ``airtrace.util``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from airtrace.util.checks import positive_int

NORM_EPS = 1e-12
"""Norms are clamped at this before a cosine divides by them (every backend, and scoring)."""


def empty_topk(q: int, topk: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, topk) of -inf values and -1 indices: the padding of an unfilled top-k."""
    values = torch.full((q, topk), float("-inf"), dtype=dtype, device=device)
    indices = torch.full((q, topk), -1, dtype=torch.int64, device=device)
    return values, indices


def order(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by value descending, equal values by lower index (-1 padding last)."""
    key = torch.where(indices < 0, torch.iinfo(torch.int64).max, indices)
    by_index = torch.argsort(key, dim=1, stable=True)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    by_value = torch.argsort(values, dim=1, descending=True, stable=True)
    return values.gather(1, by_value), indices.gather(1, by_value)


def merge_topk(
    values: Sequence[torch.Tensor], indices: Sequence[torch.Tensor], topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine per-shard ``score_topk`` results into one (q, topk) top-k.

    Args:
        values: per-shard (q, k_s) score tensors.
        indices: matching per-shard (q, k_s) int64 global indices (-1 = empty slot).
        topk: results per query to keep.

    Returns:
        values (q, topk) and indices (q, topk), sorted as in ``score_topk``.
    """
    topk = positive_int("topk", topk)
    if len(values) == 0 or len(values) != len(indices):
        raise ValueError(f"values and indices must be equal-length non-empty sequences, got {len(values)} and {len(indices)}")
    q = values[0].shape[0]
    for i, (v, j) in enumerate(zip(values, indices)):
        if v.dim() != 2 or v.shape != j.shape or v.shape[0] != q:
            raise ValueError(f"values[{i}] and indices[{i}] must both be (q={q}, k_s), got {tuple(v.shape)} and {tuple(j.shape)}")
    v = torch.cat(list(values), dim=1)
    i = torch.cat(list(indices), dim=1)
    if v.shape[1] < topk:
        pad_v, pad_i = empty_topk(v.shape[0], topk - v.shape[1], v.dtype, v.device)
        v, i = torch.cat([v, pad_v], 1), torch.cat([i, pad_i], 1)
    v, i = order(v, i)
    return v[:, :topk].contiguous(), i[:, :topk].contiguous()
