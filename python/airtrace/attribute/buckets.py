"""Length buckets of a padded batch (``length_buckets``, ``bucket_batch``): its rows regrouped so that a group is cut
to its own longest row and no forward or backward runs on trailing padding; imports ``.batches``.

A row's length is one past its last token with a nonzero attention mask. The rows, sorted by
length, are split into contiguous groups that minimise ``Σ_groups (rows × longest length +
GROUP_COST_TOKENS)``: the padded tokens computed plus a fixed cost per model call (reading the
weights, launching every op), in tokens. Each group's sequence tensors (every tensor of shape
(B, T, ...) with the mask's B and T) are cut to the group's longest length; the other per-example
tensors are indexed by row. Leading padding (left-padded rows) is kept as it is: cutting it
would shift positions.

This is exact for any model in which a token depends on the tokens after it only through
attention that the mask hides (every Hugging Face model given ``attention_mask``), with a loss
that ignores padding: the features of every example are the same as in the padded batch, up to
float round-off of the changed shapes.
"""

from __future__ import annotations

from typing import Any

import torch

from airtrace.attribute.batches import attention_mask, map_tensors, select_rows

GROUP_COST_TOKENS = 32
"""The fixed cost of one model call, in tokens of a batch: what the length buckets trade against the padding they
save."""


def row_lengths(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) attention mask -> (B,) int64: one past each row's last nonzero entry (0 for an empty row)."""
    T = mask.shape[1]
    live = (mask != 0).to(torch.int64)
    return torch.where(live.any(1), T - live.flip(1).argmax(1), torch.zeros_like(live[:, 0]))


def length_buckets(lengths: list[int], group_cost: int = GROUP_COST_TOKENS) -> list[tuple[list[int], int]]:
    """The cheapest split of rows into groups of similar length.

    Args:
        lengths: each row's length.
        group_cost: the fixed cost of one group, in tokens.

    Returns:
        [(rows, length), ...]: the row indices of each group (ascending length) and the group's
        longest length; every row is in exactly one group.
    """
    order = sorted(range(len(lengths)), key=lambda j: (lengths[j], j))
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[i]: cost of the first i sorted rows
    cut = [0] * (n + 1)
    for i in range(1, n + 1):
        longest = max(lengths[order[i - 1]], 1)
        for j in range(i):  # a last group of sorted rows j..i-1, cut to the i-th row's length
            cost = best[j] + (i - j) * longest + group_cost
            if cost < best[i]:
                best[i], cut[i] = cost, j
    groups = []
    i = n
    while i > 0:
        j = cut[i]
        groups.append(([order[r] for r in range(j, i)], max(lengths[order[i - 1]], 1)))
        i = j
    return groups[::-1]


def bucket_batch(batch: Any, group_cost: int = GROUP_COST_TOKENS) -> list[tuple[list[int], Any]] | None:
    """A padded batch as length buckets: [(row indices, sub-batch cut to its length), ...].

    Args:
        batch: a mapping with a (B, T) ``attention_mask``.
        group_cost: the fixed cost of one model call, in tokens.

    Returns:
        The groups, or None when there is nothing to gain: no (B, T) attention mask, an empty one, or
        no trailing padding.
    """
    mask = attention_mask(batch)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    B, T = mask.shape
    if B == 0 or T == 0:
        return None
    lengths = row_lengths(mask).tolist()
    if min(lengths, default=T) == T:
        return None
    groups = length_buckets(lengths, group_cost)
    if len(groups) == 1 and groups[0][1] == T:
        return None
    return [(rows, _cut(select_rows(batch, rows, B), T, len(rows), length)) for rows, length in groups]


def _cut(value: Any, T: int, rows: int, length: int) -> Any:
    """Tensors of shape (rows, T, ...) (a (B, T, ...) tensor after row selection) cut to (rows, length, ...)."""
    return map_tensors(value, lambda t: t[:, :length] if t.dim() >= 2 and t.shape[:2] == (rows, T) else t)
