"""The op score_topk (largest inner products or cosines per query, streamed): checks, float64 reference, compiled/Triton
dispatch and ``torch.ops.airtrace.score_topk``; imports ``airtrace.ops.backends``, ``airtrace.ops.merge_topk``,
``airtrace.util`` and its kernels."""

from __future__ import annotations

import torch

from airtrace.ops import backends
from airtrace.ops.backends import accumulation_dtype
from airtrace.ops.merge_topk import NORM_EPS, empty_topk, order
from airtrace.util.checks import check_finite_rows, check_offset, check_same_device, check_tensor, positive_int
from airtrace.util.fix import with_fix


def score_topk(
    Q: torch.Tensor,
    X: torch.Tensor,
    topk: int,
    normalize: bool = False,
    *,
    index_offset: int = 0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest inner products (or cosines) of each query with the rows of X, streamed.

    ``s[i, j] = Q[i] . X[j]`` (divided by ``max(|Q_i|, 1e-12) max(|X_j|, 1e-12)``
    when ``normalize``), computed tile by tile with a running top-k: memory is
    O(q * topk + tile), never O(q * n). Cosines are right for any finite norms
    (Q is normalised first, norms are taken without overflow or underflow).

    Every backend behaves the same on values that have no rank: a NaN/Inf in Q or X
    is a ValueError naming the first such query or row, and so is a score that
    overflows the accumulation dtype (an inner product beyond float32's range):
    rows are never dropped or misranked in silence.

    Args:
        Q: (q, k) queries.
        X: (n, k) training features, float32/bfloat16/float16 (float64: torch backend).
        topk: results per query; slots beyond n hold -inf and index -1.
        normalize: score cosines instead of inner products.
        index_offset: added to returned indices (global ids of a shard's rows);
            ``index_offset + n - 1`` must fit int64.
        backend: "auto", "torch", "cpu", "cuda" or "triton".

    Returns:
        values (q, topk) float32 (float64 for float64 inputs), sorted descending
        (equal values by lower index), and indices (q, topk) int64. Meta tensors
        give meta results of these shapes.

    Raises:
        ValueError: bad shapes or arguments, NaN/Inf inputs, or scores that overflow.
    """
    check_tensor("Q", Q, 2)
    check_tensor("X", X, 2)
    if Q.shape[1] != X.shape[1]:
        raise ValueError(f"Q (q, k) and X (n, k) must share k, got Q {tuple(Q.shape)} and X {tuple(X.shape)}")
    if Q.shape[1] == 0:
        raise ValueError("Q and X must have k >= 1 features")
    topk = positive_int("topk", topk)
    index_offset = check_offset("index_offset", index_offset, X.shape[0])
    device = check_same_device(Q=Q, X=X)
    acc = accumulation_dtype(torch.promote_types(Q.dtype, X.dtype))
    if device.type == "meta":
        return fake(Q, X, topk)
    if Q.shape[0] == 0 or X.shape[0] == 0:
        return empty_topk(Q.shape[0], topk, acc, device)
    check_finite_rows("score_topk: Q", Q, "query")
    check_finite_rows("score_topk: X", X)
    Q = Q.to(acc)
    run = IMPLEMENTATIONS[backends.choose("score_topk", backend, device, acc)]
    values, indices = run((normalized(Q) if normalize else Q).contiguous(), X.contiguous(), topk, bool(normalize),
                          index_offset)
    _check_scores(values, indices, min(topk, X.shape[0]))
    return values, indices


def _check_scores(values: torch.Tensor, indices: torch.Tensor, filled: int) -> None:
    """Every query got ``filled`` finite scores (a NaN/Inf score of finite inputs is an overflow)."""
    ok = (indices[:, :filled] >= 0).all(dim=1) & torch.isfinite(values[:, :filled]).all(dim=1)
    if not bool(ok.all()):
        query = int((~ok).nonzero()[0, 0])
        raise with_fix(ValueError(
            f"score_topk: query {query} has scores that are NaN/Inf although Q and X are finite: Q . X overflows "
            f"{values.dtype} (largest {torch.finfo(values.dtype).max:.3g}); every backend refuses rather than drop or "
            "misrank them. Fix: scale the features down, or score cosines (normalize=True)"),
            "score cosines (--metric cosine), which are scale-free.")


def normalized(x: torch.Tensor) -> torch.Tensor:
    """Rows of x divided by their norms clamped at NORM_EPS: what ``normalize`` scores with.

    Each row is divided by its largest |entry| before it is squared, so every norm in the
    dtype's range is right (float32 squares alone overflow past ~1e19 and vanish below ~1e-19).
    """
    scale = x.abs().amax(dim=1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    norm = (x / scale).norm(dim=1, keepdim=True) * scale
    return x / norm.clamp_min(NORM_EPS)


def reference(
    Q: torch.Tensor,
    X: torch.Tensor,
    topk: int,
    normalize: bool = False,
    index_offset: int = 0,
    tile: int = 8192,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backend "torch": top-k of s = Q X^T (cosine if ``normalize``) per query, tile by tile.

    Memory is O(q * (topk + tile)); the (q, n) matrix is never formed.
    """
    acc = accumulation_dtype(torch.promote_types(Q.dtype, X.dtype))
    Qa = Q.to(acc)
    if normalize:
        Qa = normalized(Qa)
    values, indices = empty_topk(Q.shape[0], topk, acc, Q.device)
    for start in range(0, X.shape[0], tile):
        Xt = X[start : start + tile].to(acc)
        if normalize:
            Xt = normalized(Xt)
        s = Qa @ Xt.T
        j = torch.arange(start, start + Xt.shape[0], device=Q.device) + index_offset
        cand_v = torch.cat([values, s], dim=1)
        cand_i = torch.cat([indices, j.expand(Q.shape[0], -1)], dim=1)
        top_v, pos = torch.topk(cand_v, min(topk, cand_v.shape[1]), dim=1)
        values, indices = top_v, cand_i.gather(1, pos)
    return order(values, indices)


def _compiled(backend: str, Q, X, topk, normalize, index_offset):
    """Backends "cpu" / "cuda": the C++ / CUDA kernel (csrc/*/score_topk.*) on raw pointers."""
    lib, stream = backends.library(backend)
    code = backends.dtype_code(X, "X", backend)
    Q = Q.float().contiguous()
    q, n, k = Q.shape[0], X.shape[0], X.shape[1]
    values = torch.empty(q, topk, dtype=torch.float32, device=Q.device)
    indices = torch.empty(q, topk, dtype=torch.int64, device=Q.device)
    lib.score_topk(
        Q.data_ptr(), X.data_ptr(), code, q, n, k, topk, bool(normalize), index_offset,
        values.data_ptr(), indices.data_ptr(), stream(Q.device),
    )
    return values, indices


def _triton(*args):
    """Backend "triton": kernels/score_topk.py (Triton is optional, so it is imported on use)."""
    from airtrace.kernels.score_topk import score_topk as kernel

    return kernel(*args)


def fake(Q, X, topk, normalize=False, index_offset=0, backend="auto"):
    """The results' shapes, dtypes and device without computing them (meta and fake tensors)."""
    values = Q.new_empty((Q.shape[0], topk), dtype=accumulation_dtype(torch.promote_types(Q.dtype, X.dtype)))
    return values, Q.new_empty((Q.shape[0], topk), dtype=torch.int64)


IMPLEMENTATIONS = backends.implementations(reference, _compiled, _triton)


@torch.library.custom_op("airtrace::score_topk", mutates_args=())
def torch_op(Q: torch.Tensor, X: torch.Tensor, topk: int, normalize: bool = False, index_offset: int = 0,
             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``s[i, j] = Q[i] . X[j]`` (or cosine) per query: (q, k), (n, k) -> values, indices (q, topk).

    See :func:`score_topk`.
    """
    return score_topk(Q, X, topk, normalize, index_offset=index_offset, backend=backend)


torch_op.register_fake(fake)
