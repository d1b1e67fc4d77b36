"""Group scores: attention pooling of query x member dot products; imports the kernels layer (``group_pool_scores``).

For a query embedding ``e(x)`` and a group ``S`` of training embeddings:

    s_i = e(x)·e(z_i),   α_i = softmax_{i∈S}(|s_i|),   f(x, S) = Σ_{i∈S} α_i s_i

(``"attention"``, the published training objective), ``α_i = softmax_{i∈S}(s_i)``
(``"attention-signed"``, the published evaluation code's score), or
``f(x, S) = Σ_{i∈S} s_i`` (``"sum"``, the additive baseline). A single
example's score is the plain dot product. An empty group scores 0. The softmax
subtracts the largest logit first, so it is stable for any magnitude.

:func:`pool` is differentiable and works on padded (…, m) blocks (training);
:func:`group_scores` scores CSR groups at inference, ``"attention"`` through the
``group_pool_scores`` kernel without materialising q × n (``"attention-signed"``
pads the groups and materialises q × G × max group size).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

POOLINGS = ("attention", "attention-signed", "sum")


def check_pooling(pooling: str) -> str:
    """``pooling`` if it is one of POOLINGS, else a ValueError listing them."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return pooling


def pool(s: torch.Tensor, mask: torch.Tensor | None = None, pooling: str = "attention") -> torch.Tensor:
    """Pool member scores over the last dimension (differentiable).

    Args:
        s: (..., m) member scores ``s_i``, floating point.
        mask: (..., m) bool, True for members (padding False); default all True.
        pooling: "attention" (``Σ softmax(|s|)_i s_i``), "attention-signed" (``Σ softmax(s)_i s_i``) or "sum"
            (``Σ s_i``).

    Returns:
        (...) group scores in the dtype of ``s``; 0 where a row has no member.
    """
    check_pooling(pooling)
    if mask is None:
        mask = torch.ones_like(s, dtype=torch.bool)
    if mask.shape != s.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of the shape of s {tuple(s.shape)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    s = torch.where(mask, s, torch.zeros((), dtype=s.dtype, device=s.device))
    if pooling == "sum":
        return s.sum(dim=-1)
    a = s.abs() if pooling == "attention" else s
    top = torch.where(mask, a, torch.full((), -torch.inf, dtype=s.dtype, device=s.device)).amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).detach()  # softmax is shift-invariant
    w = torch.where(mask, torch.exp(a - top), torch.zeros((), dtype=s.dtype, device=s.device))
    den = w.sum(dim=-1)
    return (w * s).sum(dim=-1) / torch.where(den > 0, den, torch.ones_like(den))


def padded_members(offsets: torch.Tensor, members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR groups as a padded block: ``index`` (G, w) int64 member rows (0 at padding) and ``valid`` (G, w) bool,
    w = the largest group size (at least 1)."""
    sizes = offsets.diff()
    width = max(int(sizes.max()), 1) if sizes.numel() else 1
    rows = torch.repeat_interleave(torch.arange(sizes.numel(), device=members.device), sizes)
    slot = torch.arange(members.numel(), device=members.device) - offsets[:-1][rows]
    index = torch.zeros(sizes.numel(), width, dtype=torch.long, device=members.device)
    valid = torch.zeros(sizes.numel(), width, dtype=torch.bool, device=members.device)
    index[rows, slot], valid[rows, slot] = members, True
    return index, valid


def masks_to_csr(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR form of boolean group masks.

    Args:
        masks: (G, n) bool, row g marks the members of group g.

    Returns:
        ``offsets`` (G + 1,) int64 and ``members`` (nnz,) int64 (sorted within each group).
    """
    if masks.dim() != 2 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be a 2-D bool tensor (G, n), got {masks.dtype} {tuple(masks.shape)}")
    rows, members = masks.nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=masks.shape[0])
    offsets = torch.zeros(masks.shape[0] + 1, dtype=torch.long)
    offsets[1:] = counts.cumsum(0)
    return offsets, members.to(torch.long)


def groups_to_csr(groups: Sequence[Sequence[int]], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR form (``offsets`` (G + 1,), ``members`` (nnz,) int64) of G lists of train rows in [0, n).

    Raises:
        ValueError: a member outside [0, n).
    """
    offsets = [0]
    members: list[int] = []
    for g, group in enumerate(groups):
        group = [int(i) for i in group]
        bad = [i for i in group if not 0 <= i < n]
        if bad:
            raise ValueError(f"group {g} has rows {bad[:5]} outside [0, {n})")
        members.extend(group)
        offsets.append(len(members))
    return torch.tensor(offsets, dtype=torch.long), torch.tensor(members, dtype=torch.long)


def group_scores(queries: torch.Tensor, train: torch.Tensor, offsets: torch.Tensor, members: torch.Tensor, *,
                 pooling: str = "attention", backend: str = "auto") -> torch.Tensor:
    """Scores (q, G) of CSR groups of training embeddings for every query (no autograd).

    "attention" runs the ``group_pool_scores`` op; "sum" uses
    ``Σ_{i∈S} e(x)·e(z_i) = e(x)·Σ_{i∈S} e(z_i)``.

    Args:
        queries: (q, d) query embeddings.
        train: (n, d) training embeddings.
        offsets: (G + 1,) int64 group boundaries into ``members``.
        members: (nnz,) int64 train rows.
        pooling: "attention", "attention-signed" or "sum".
        backend: kernel backend for "attention".

    Returns:
        (q, G) in the dtype of ``queries``.
    """
    from airtrace.ops.group_pool_scores import group_pool_scores

    check_pooling(pooling)
    if pooling == "attention":
        return group_pool_scores(queries, train, offsets, members, backend=backend)
    if queries.dim() != 2 or train.dim() != 2 or queries.shape[1] != train.shape[1]:
        raise ValueError(f"queries (q, d) and train (n, d) must share d, got {tuple(queries.shape)} "
                         f"and {tuple(train.shape)}")
    if pooling == "attention-signed":
        index, valid = padded_members(offsets, members)
        s = (queries @ train.T.to(queries.dtype))[:, index]                  # (q, G, w)
        return pool(s, valid.expand_as(s), pooling)
    groups = torch.repeat_interleave(torch.arange(offsets.numel() - 1, device=members.device), offsets.diff())
    sums = torch.zeros(offsets.numel() - 1, train.shape[1], dtype=queries.dtype, device=train.device)
    sums.index_add_(0, groups, train[members].to(queries.dtype))
    return queries @ sums.T
