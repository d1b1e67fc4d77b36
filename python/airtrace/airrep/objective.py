"""Datamodel labels and the pairwise RankNet objective; imports nothing from airtrace.

Labels: for dev example x and subset model k with loss ``ℓ_kx``,
``y_kx = clip((μ_x − ℓ_kx) / σ_x, −10, 10)`` with μ_x, σ_x the mean and
(population) standard deviation of ``ℓ_·x`` over the subset models (σ_x = 1 when
it is 0). Higher = subset k helps x more.

Loss, per dev example x over its subsets: every ordered pair (i, j) with label
gap ``y_i − y_j > t_min`` contributes ``min(y_i − y_j, t_max) · softplus(−(f_i − f_j))``;
the loss is the mean over the kept pairs of all dev examples in the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CLIP = 10.0
T_MIN = 0.1
T_MAX = 5.0


def normalize_labels(losses: torch.Tensor, clip: float = CLIP) -> torch.Tensor:
    """Per-column standardised labels ``clip((μ_x − ℓ) / σ_x, ±clip)``.

    Args:
        losses: (m, q) loss of dev example x (column) under subset model k (row).
        clip: bound of the labels.

    Returns:
        (m, q) labels in the dtype of ``losses``.
    """
    if losses.dim() != 2 or losses.shape[0] < 1:
        raise ValueError(f"losses must be (m, q) with m >= 1, got {tuple(losses.shape)}")
    mu = losses.mean(dim=0, keepdim=True)
    sigma = losses.std(dim=0, unbiased=False, keepdim=True)
    sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    return ((mu - losses) / sigma).clamp(-clip, clip)


def ranknet_loss(f: torch.Tensor, y: torch.Tensor, t_min: float = T_MIN, t_max: float = T_MAX) -> torch.Tensor:
    """Weighted pairwise RankNet loss over subsets, per dev example.

    Args:
        f: (B, K) predicted group scores of K subsets for B dev examples.
        y: (B, K) their labels.
        t_min: a pair counts when its label gap exceeds this.
        t_max: cap of a pair's weight.

    Returns:
        Scalar: the mean over kept pairs of ``min(gap, t_max) · softplus(−(f_i − f_j))``;
        0 (still attached to ``f``) when no pair is kept.
    """
    if f.shape != y.shape or f.dim() != 2:
        raise ValueError(f"f and y must both be (B, K), got {tuple(f.shape)} and {tuple(y.shape)}")
    gap = y.unsqueeze(2) - y.unsqueeze(1)                # (B, K, K): y_i - y_j
    keep = gap > t_min
    if not keep.any():
        return f.sum() * 0.0
    diff = f.unsqueeze(2) - f.unsqueeze(1)               # f_i - f_j
    weight = gap.clamp(max=t_max).to(f.dtype)
    return (weight * F.softplus(-diff))[keep].mean()
