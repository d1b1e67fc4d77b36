"""The op group_pool_scores (AirRep attention pooling of training groups): checks, float64 reference, compiled/Triton
dispatch and ``torch.ops.airtrace.group_pool_scores``; imports ``airtrace.ops.backends``, ``airtrace.util`` and its
kernels."""

from __future__ import annotations

import torch

from airtrace.ops import backends
from airtrace.ops.backends import accumulation_dtype
from airtrace.util.checks import check_same_device, check_tensor


def _check_groups(offsets, members, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate CSR groups over n rows; returns (offsets, members) as contiguous int64."""
    for name, t in (("offsets", offsets), ("members", members)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer (int64) tensor, got {t.dtype}")
    if offsets.numel() == 0:
        raise ValueError("offsets must hold G + 1 >= 1 entries (0, end of group 0, ..., len(members)), got none")
    offsets = offsets.to(torch.int64).contiguous()
    members = members.to(torch.int64).contiguous()
    if offsets.device.type == "meta" or members.device.type == "meta":
        return offsets, members  # no values to check
    nnz = members.numel()
    first, last = int(offsets[0]), int(offsets[-1])
    if first != 0:
        raise ValueError(f"offsets[0] must be 0, got {first}")
    if last != nnz:
        raise ValueError(
            f"offsets[-1] must equal len(members) = {nnz}, got {last} (offsets has G + 1 = {offsets.numel()} entries)"
        )
    decreasing = torch.nonzero(offsets.diff() < 0)
    if decreasing.numel():
        g = int(decreasing[0, 0])
        raise ValueError(
            f"offsets must be non-decreasing, got offsets[{g}] = {int(offsets[g])} > offsets[{g + 1}] = {int(offsets[g + 1])}"
        )
    if nnz:
        lo, hi = int(members.min()), int(members.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"members must be row indices of train in [0, n={n}), got values from {lo} to {hi}")
    return offsets, members


def group_pool_scores(
    queries: torch.Tensor,
    train: torch.Tensor,
    offsets: torch.Tensor,
    members: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention-pooled scores of training groups (AirRep), in one pass.

    ``f[x, g] = sum_{i in S_g} softmax_{i in S_g}(|s_i|) s_i`` with ``s_i = queries[x] . train[i]``
    and ``S_g = members[offsets[g]:offsets[g + 1]]``; 0 for an empty group. Only the members'
    dot products are computed, group by group, pooled with a max-subtracted (online) softmax,
    so any magnitude of s is safe and the (q, n) score matrix is never formed.

    Args:
        queries: (q, d) query embeddings.
        train: (n, d) training embeddings, float32/bfloat16/float16 (float64: torch backend,
            which "auto" picks when either input is float64).
        offsets: (G + 1,) integer CSR offsets: 0, non-decreasing, ending at len(members).
        members: (nnz,) integer row indices into train; groups may overlap, repeat a row
            (it then counts twice) or be empty.
        backend: "auto", "torch", "cpu", "cuda" or "triton".

    Returns:
        (q, G) float32 (float64 when either input is float64); accumulation is fp32 on the
        compiled backends. A NaN or infinite score makes its group's result NaN on every
        backend (the other groups keep theirs). Meta tensors give a meta result of this shape.
    """
    check_tensor("queries", queries, 2)
    check_tensor("train", train, 2)
    if queries.shape[1] != train.shape[1]:
        raise ValueError(
            f"queries (q, d) and train (n, d) must share d, got queries {tuple(queries.shape)} and train {tuple(train.shape)}"
        )
    if queries.shape[1] == 0:
        raise ValueError("queries and train must have d >= 1 features")
    offsets, members = _check_groups(offsets, members, train.shape[0])
    device = check_same_device(queries=queries, train=train, offsets=offsets, members=members)
    acc = accumulation_dtype(torch.promote_types(queries.dtype, train.dtype))
    q, G = queries.shape[0], offsets.numel() - 1
    if device.type == "meta":
        return fake(queries, train, offsets, members)
    if q == 0 or members.numel() == 0:
        return torch.zeros(q, G, dtype=acc, device=device)
    run = IMPLEMENTATIONS[backends.choose("group_pool_scores", backend, device, acc)]
    return run(queries.to(acc).contiguous(), train.contiguous(), offsets, members)


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


def reference(
    queries: torch.Tensor,
    train: torch.Tensor,
    offsets: torch.Tensor,
    members: torch.Tensor,
    tile: int = 8192,
) -> torch.Tensor:
    """Backend "torch": f[x, g] = sum_{i in S_g} softmax_{i in S_g}(|s_i|) s_i with s_i = queries[x] . train[i]; 0 for empty S_g.

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


def _compiled(backend: str, queries, train, offsets, members):
    """Backends "cpu" / "cuda": the C++ / CUDA kernel (csrc/*/group_pool_scores.*) on raw pointers."""
    lib, stream = backends.library(backend)
    code = backends.dtype_code(train, "train", backend)
    queries = queries.float().contiguous()
    q, d = queries.shape
    G = offsets.shape[0] - 1
    out = torch.empty(q, G, dtype=torch.float32, device=queries.device)
    lib.group_pool_scores(
        queries.data_ptr(), train.data_ptr(), code, q, d, offsets.data_ptr(), members.data_ptr(), G,
        out.data_ptr(), stream(queries.device),
    )
    return out


def _triton(*args):
    """Backend "triton": kernels/group_pool_scores.py (Triton is optional, so it is imported on use)."""
    from airtrace.kernels.group_pool_scores import group_pool_scores as kernel

    return kernel(*args)


def fake(queries, train, offsets, members, backend="auto"):
    """The result's shape, dtype and device without computing it (meta and fake tensors)."""
    dtype = accumulation_dtype(torch.promote_types(queries.dtype, train.dtype))
    return queries.new_empty((queries.shape[0], offsets.shape[0] - 1), dtype=dtype)


IMPLEMENTATIONS = backends.implementations(reference, _compiled, _triton)


@torch.library.custom_op("airtrace::group_pool_scores", mutates_args=())
def torch_op(queries: torch.Tensor, train: torch.Tensor, offsets: torch.Tensor, members: torch.Tensor,
             backend: str = "auto") -> torch.Tensor:
    """``f[x, g] = sum_{i in S_g} softmax_{S_g}(|s_i|) s_i``, ``s_i = queries[x] . train[i]``: -> (q, G).

    See :func:`group_pool_scores`.
    """
    return group_pool_scores(queries, train, offsets, members, backend=backend)


torch_op.register_fake(fake)
