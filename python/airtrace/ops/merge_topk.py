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
        values: per-shard (q, k_s) float score tensors (one dtype), no NaN; -inf only in empty slots.
        indices: matching per-shard (q, k_s) int64 global indices (-1 = empty slot, else >= 0).
        topk: results per query to keep.

    Returns:
        values (q, topk) and indices (q, topk), sorted as in ``score_topk``.

    Raises:
        TypeError: an entry that is not a tensor. ValueError: naming the entry: mismatched
            shapes, dtypes or devices, a NaN score, or an index below -1.
    """
    topk = positive_int("topk", topk)
    for name, seq in (("values", values), ("indices", indices)):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, Sequence):
            raise TypeError(f"{name} must be a list of (q, k_s) tensors, one per shard, got {type(seq).__name__}")
    if len(values) == 0 or len(values) != len(indices):
        raise ValueError(f"values and indices must be equal-length non-empty sequences, got {len(values)} and {len(indices)}")
    for i, (v, j) in enumerate(zip(values, indices)):
        if not isinstance(v, torch.Tensor) or not isinstance(j, torch.Tensor):
            raise TypeError(f"values[{i}] and indices[{i}] must be tensors, got {type(v).__name__} and "
                            f"{type(j).__name__}")
    q, dtype, device = values[0].shape[0] if values[0].dim() else None, values[0].dtype, values[0].device
    for i, (v, j) in enumerate(zip(values, indices)):
        if v.dim() != 2 or v.shape != j.shape or v.shape[0] != q:
            raise ValueError(f"values[{i}] and indices[{i}] must both be (q={q}, k_s), got {tuple(v.shape)} and {tuple(j.shape)}")
        if not v.is_floating_point() or v.dtype != dtype:
            raise ValueError(f"values[{i}] must be a float tensor of values[0]'s dtype {dtype}, got {v.dtype}")
        if j.dtype != torch.int64:
            raise ValueError(f"indices[{i}] must be int64 (as score_topk returns), got {j.dtype}")
        if v.device != device or j.device != device:
            raise ValueError(f"values[{i}] and indices[{i}] must be on values[0]'s device {device}, got {v.device} "
                             f"and {j.device}")
        if device.type != "meta" and v.numel():
            if bool(v.isnan().any()):
                raise ValueError(f"values[{i}] holds NaN scores, which have no rank")
            if bool((j < -1).any()):
                raise ValueError(f"indices[{i}] holds indices below -1 (-1 marks an empty slot)")
    return combine_topk(values, indices, topk)


def combine_topk(values: Sequence[torch.Tensor], indices: Sequence[torch.Tensor], topk: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`merge_topk` without its input checks, for partial results that a score_topk backend made itself
    (whose caller checks the merged scores)."""
    v = torch.cat(list(values), dim=1)
    i = torch.cat(list(indices), dim=1)
    if v.shape[1] < topk:
        pad_v, pad_i = empty_topk(v.shape[0], topk - v.shape[1], v.dtype, v.device)
        v, i = torch.cat([v, pad_v], 1), torch.cat([i, pad_i], 1)
    v, i = order(v, i)
    return v[:, :topk].contiguous(), i[:, :topk].contiguous()
