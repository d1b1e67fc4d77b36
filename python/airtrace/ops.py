"""Public kernels: validate the arguments, then dispatch to a backend.

Every op takes ``backend="auto" | "torch" | "cpu" | "cuda" | "triton"``
($AIRTRACE_BACKEND overrides "auto"). All backends compute the same math; the
"torch" backend is the float64-capable reference.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from airtrace import _dispatch
from airtrace._checks import positive_int
from airtrace.ref.hash import KINDS
from airtrace.ref.project import accumulation_dtype
from airtrace.ref.score import empty_topk, merge_topk as _merge_topk

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MAX_SEED = 2**32


def _check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a float32/bfloat16/float16/float64 tensor, got {t.dtype}")


def _check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return first


def project_factored(
    A: torch.Tensor,
    G: torch.Tensor,
    P_in: torch.Tensor,
    P_out: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Factored (LoGra) projection of per-sample linear-layer gradients.

    ``out[b] = sum_t m[b,t] (G[b,t] P_out)^T (A[b,t] P_in)``, i.e. the per-sample
    weight gradient ``sum_t G_bt (x) A_bt`` projected by ``P_out^T . P_in``
    without ever forming it.

    Args:
        A: layer inputs (B, T, d_in), float32/bfloat16/float16 (float64: torch backend).
        G: gradients w.r.t. layer outputs (B, T, d_out), same dtype as A.
        P_in: (d_in, k_in) projection of the input side.
        P_out: (d_out, k_out) projection of the output side.
        mask: optional (B, T) token mask (bool or float); masked tokens contribute 0.
        backend: "auto", "torch", "cpu", "cuda" or "triton".

    Returns:
        (B, k_out, k_in) float32 (float64 for float64 inputs).
    """
    _check_tensor("A", A, 3)
    _check_tensor("G", G, 3)
    _check_tensor("P_in", P_in, 2)
    _check_tensor("P_out", P_out, 2)
    if G.dtype != A.dtype:
        raise ValueError(f"G must have A's dtype {A.dtype}, got {G.dtype}")
    B, T, d_in = A.shape
    if tuple(G.shape[:2]) != (B, T):
        raise ValueError(f"G must be (B, T, d_out) with (B, T) = {(B, T)} from A, got shape {tuple(G.shape)}")
    if P_in.shape[0] != d_in or P_in.shape[1] < 1:
        raise ValueError(f"P_in must be (d_in={d_in}, k_in>=1), got shape {tuple(P_in.shape)}")
    if P_out.shape[0] != G.shape[2] or P_out.shape[1] < 1:
        raise ValueError(f"P_out must be (d_out={G.shape[2]}, k_out>=1), got shape {tuple(P_out.shape)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, T):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a (B, T) = {(B, T)} tensor, got {shape}")
    device = _check_same_device(A=A, G=G, P_in=P_in, P_out=P_out, mask=mask)
    acc = accumulation_dtype(A.dtype)
    if B == 0 or T == 0:
        return torch.zeros(B, P_out.shape[1], P_in.shape[1], dtype=acc, device=device)
    _, impl = _dispatch.resolve("project_factored", backend, device)
    mask = None if mask is None else mask.to(acc).contiguous()
    return impl(A.contiguous(), G.contiguous(), P_in.to(acc).contiguous(), P_out.to(acc).contiguous(), mask)


def project_dense(
    X: torch.Tensor | Sequence[torch.Tensor],
    k: int,
    seed: int,
    kind: str = "rademacher",
    *,
    row_offset: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Dense random projection with an implicit, never-stored matrix.

    ``out = X @ R[row_offset : row_offset + p]`` where ``R[r, c]`` is a
    counter-based hash of (seed, r, c): +-1/sqrt(k) ("rademacher") or N(0, 1/k)
    ("gaussian"); every backend generates the same entries. Row indices are
    64-bit, so p may exceed 2^31.

    Args:
        X: (B, p) tensor, or a sequence of per-layer blocks (B, p_i) that act as
            their concatenation along dim 1 (no copy is made).
        k: projection dimension.
        seed: 32-bit seed, 0 <= seed < 2^32.
        kind: "rademacher" or "gaussian".
        row_offset: first row of R used by X (for blocks of a larger vector).
        backend: "auto", "torch", "cpu", "cuda" or "triton".

    Returns:
        (B, k) float32 (float64 for float64 inputs).
    """
    blocks = [X] if isinstance(X, torch.Tensor) else list(X)
    if not blocks:
        raise ValueError("X must be a tensor or a non-empty sequence of (B, p_i) tensors")
    for i, block in enumerate(blocks):
        _check_tensor("X" if len(blocks) == 1 else f"X[{i}]", block, 2)
    B, dtype = blocks[0].shape[0], blocks[0].dtype
    for i, block in enumerate(blocks):
        if block.shape[0] != B or block.dtype != dtype:
            raise ValueError(
                f"X[{i}] must be (B={B}, p_i) with dtype {dtype}, got shape {tuple(block.shape)} dtype {block.dtype}"
            )
    k = positive_int("k", k)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be an int in [0, 2^32), got {seed!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(row_offset, bool) or not isinstance(row_offset, int) or row_offset < 0:
        raise ValueError(f"row_offset must be a non-negative int, got {row_offset!r}")
    device = _check_same_device(**{f"X[{i}]": b for i, b in enumerate(blocks)})
    out = torch.zeros(B, k, dtype=accumulation_dtype(dtype), device=device)
    if B == 0:
        return out
    _, impl = _dispatch.resolve("project_dense", backend, device)
    for block in blocks:
        if block.shape[1] > 0:
            impl(block if block.stride(1) == 1 else block.contiguous(), k, seed, kind, row_offset, out)
        row_offset += block.shape[1]
    return out


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
    O(q * topk + tile), never O(q * n).

    Args:
        Q: (q, k) queries.
        X: (n, k) training features, float32/bfloat16/float16 (float64: torch backend).
        topk: results per query; slots beyond n hold -inf and index -1.
        normalize: score cosines instead of inner products.
        index_offset: added to returned indices (global ids of a shard's rows).
        backend: "auto", "torch", "cpu", "cuda" or "triton".

    Returns:
        values (q, topk) float32 (float64 for float64 inputs), sorted descending
        (equal values by lower index), and indices (q, topk) int64.
    """
    _check_tensor("Q", Q, 2)
    _check_tensor("X", X, 2)
    if Q.shape[1] != X.shape[1]:
        raise ValueError(f"Q (q, k) and X (n, k) must share k, got Q {tuple(Q.shape)} and X {tuple(X.shape)}")
    if Q.shape[1] == 0:
        raise ValueError("Q and X must have k >= 1 features")
    topk = positive_int("topk", topk)
    if isinstance(index_offset, bool) or not isinstance(index_offset, int) or index_offset < 0:
        raise ValueError(f"index_offset must be a non-negative int, got {index_offset!r}")
    device = _check_same_device(Q=Q, X=X)
    acc = accumulation_dtype(torch.promote_types(Q.dtype, X.dtype))
    if Q.shape[0] == 0 or X.shape[0] == 0:
        return empty_topk(Q.shape[0], topk, acc, device)
    _, impl = _dispatch.resolve("score_topk", backend, device)
    return impl(Q.to(acc).contiguous(), X.contiguous(), topk, bool(normalize), index_offset)


def precondition(
    G_hat: torch.Tensor,
    Q_G: torch.Tensor,
    Q_A: torch.Tensor,
    Lam: torch.Tensor,
    damping: float,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """K-FAC / EK-FAC inverse curvature in a Kronecker eigenbasis, applied per sample.

    ``out[b] = Q_G [(Q_Gᵀ Ĝ_b Q_A) / (Λ + λ)] Q_Aᵀ``, i.e. ``(Q diag(vec Λ) Qᵀ + λI)⁻¹ vec(Ĝ_b)``
    with ``Q = kron(Q_G, Q_A)`` (row-major vec) when Q_G and Q_A are orthonormal. The kernels
    fuse the four products per sample: the rotated intermediate never reaches global memory.

    Args:
        G_hat: (B, k_out, k_in) projected per-sample gradients, float32/bfloat16/float16
            (float64: torch backend, which "auto" picks for float64).
        Q_G: (k_out, k_out) eigenvectors (columns) of the output-side factor.
        Q_A: (k_in, k_in) eigenvectors (columns) of the input-side factor.
        Lam: (k_out, k_in) eigenvalues in the basis ``kron(Q_G, Q_A)``.
        damping: λ, finite and >= 0; ``Lam + damping`` must be > 0 elementwise.
        backend: "auto", "torch", "cpu", "cuda" or "triton". For float64 G_hat "auto"
            means "torch" (the compiled kernels accumulate in fp32), even when
            $AIRTRACE_BACKEND is set.

    Returns:
        (B, k_out, k_in) float32 (float64 for float64 G_hat). Q_G, Q_A and Lam are
        used in that dtype; accumulation is fp32 on the compiled backends.
    """
    _check_tensor("G_hat", G_hat, 3)
    _check_tensor("Q_G", Q_G, 2)
    _check_tensor("Q_A", Q_A, 2)
    _check_tensor("Lam", Lam, 2)
    B, k_out, k_in = G_hat.shape
    for name, t, want in (("Q_G", Q_G, (k_out, k_out)), ("Q_A", Q_A, (k_in, k_in)), ("Lam", Lam, (k_out, k_in))):
        if tuple(t.shape) != want:
            raise ValueError(
                f"{name} must be {want} for G_hat (B, k_out, k_in) = {tuple(G_hat.shape)}, got shape {tuple(t.shape)}"
            )
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real) or not math.isfinite(damping) or damping < 0:
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    damping = float(damping)
    device = _check_same_device(G_hat=G_hat, Q_G=Q_G, Q_A=Q_A, Lam=Lam)
    acc = accumulation_dtype(G_hat.dtype)
    Lam = Lam.to(acc)
    denominator = Lam + damping
    if not bool((denominator > 0).all()):
        bad = ~(denominator > 0)
        raise ValueError(
            f"Lam + damping must be > 0 elementwise, got {int(bad.sum())} of {Lam.numel()} entries <= 0 or NaN "
            f"(min Lam = {Lam.min().item():.6g}, damping = {damping:.6g}); eigenvalues must be >= 0 (clamp "
            "round-off negatives) and damping > 0 where an eigenvalue is 0"
        )
    if G_hat.numel() == 0:
        return torch.zeros(B, k_out, k_in, dtype=acc, device=device)
    if backend == "auto" and G_hat.dtype == torch.float64:
        backend = "torch"
    _, impl = _dispatch.resolve("precondition", backend, device)
    return impl(G_hat.contiguous(), Q_G.to(acc).contiguous(), Q_A.to(acc).contiguous(), Lam.contiguous(), damping)


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
        compiled backends.
    """
    _check_tensor("queries", queries, 2)
    _check_tensor("train", train, 2)
    if queries.shape[1] != train.shape[1]:
        raise ValueError(
            f"queries (q, d) and train (n, d) must share d, got queries {tuple(queries.shape)} and train {tuple(train.shape)}"
        )
    if queries.shape[1] == 0:
        raise ValueError("queries and train must have d >= 1 features")
    offsets, members = _check_groups(offsets, members, train.shape[0])
    device = _check_same_device(queries=queries, train=train, offsets=offsets, members=members)
    acc = accumulation_dtype(torch.promote_types(queries.dtype, train.dtype))
    q, G = queries.shape[0], offsets.numel() - 1
    if q == 0 or members.numel() == 0:
        return torch.zeros(q, G, dtype=acc, device=device)
    if backend == "auto" and acc == torch.float64:
        backend = "torch"
    _, impl = _dispatch.resolve("group_pool_scores", backend, device)
    return impl(queries.to(acc).contiguous(), train.contiguous(), offsets, members)


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
    return _merge_topk(list(values), list(indices), topk)

