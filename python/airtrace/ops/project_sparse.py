"""The op project_sparse (sparse Johnson-Lindenstrauss projection: each input coordinate hashed to s output
coordinates with random signs, no matrix stored): checks, float64 reference, compiled/Triton dispatch and
``torch.ops.airtrace.project_sparse``; imports ``airtrace.ops.backends``, ``airtrace.ops.hash``, ``airtrace.util`` and
its kernels."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from airtrace.ops import backends
from airtrace.ops.backends import accumulation_dtype
from airtrace.ops.hash import MAX_SPARSITY, check_seed, sparse_entries
from airtrace.ops.project_dense import checked_blocks, project_blocks
from airtrace.util.checks import positive_int


def check_sparsity(s, k: int) -> int:
    """``s`` if it is an int in 1..MAX_SPARSITY and at most k, else a ValueError naming it."""
    if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= MAX_SPARSITY:
        raise ValueError(f"s (nonzeros per input coordinate) must be an int in 1..{MAX_SPARSITY}, got {s!r}")
    if s > k:
        raise ValueError(f"s={s} nonzeros per input coordinate need k >= s output columns, got k={k}")
    return s


def project_sparse(
    X: torch.Tensor | Sequence[torch.Tensor],
    k: int,
    s: int,
    seed: int,
    *,
    row_offset: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Sparse random projection with an implicit, never-stored matrix.

    ``out = X @ R[row_offset : row_offset + p]`` where row r of R has exactly s
    nonzeros ``±1/sqrt(s)``, one in each of s blocks of the k columns, placed and
    signed by the counter-based hash of (seed, r, j) that project_dense's entries use
    (:func:`airtrace.ops.hash.sparse_entries`); every backend generates the same
    matrix. The work is O(B p s), not O(B p k).

    Args:
        X: (B, p) tensor, or a sequence of per-layer blocks (B, p_i) that act as
            their concatenation along dim 1 (no copy is made).
        k: projection dimension.
        s: nonzeros per row of R (input coordinate), 1..4, at most k.
        seed: 32-bit seed, 0 <= seed < 2^32.
        row_offset: first row of R used by X (for blocks of a larger vector).
        backend: "auto", "torch", "cpu", "cuda" or "triton".

    Returns:
        (B, k) float32 (float64 for float64 inputs).
    """
    blocks = checked_blocks(X)
    k = positive_int("k", k)
    s = check_sparsity(s, k)
    check_seed(seed)
    return project_blocks("project_sparse", IMPLEMENTATIONS, blocks, k, (s, seed), row_offset, backend)


def reference(
    X: torch.Tensor,
    k: int,
    s: int,
    seed: int,
    row_offset: int = 0,
    out: torch.Tensor | None = None,
    rows_per_chunk: int = 4096,
) -> torch.Tensor:
    """Backend "torch": out[b, col_j(i)] (+)= value_j(i) X[b, i] for j < s, i < p (``sparse_entries``).

    The nonzeros are generated in chunks of ``rows_per_chunk`` rows and scattered with
    ``index_add_``; memory is O(B * rows_per_chunk * s).
    """
    acc = accumulation_dtype(X.dtype)
    B, p = X.shape
    if out is None:
        out = torch.zeros(B, k, dtype=acc, device=X.device)
    for start in range(0, p, rows_per_chunk):
        stop = min(start + rows_per_chunk, p)
        columns, values = sparse_entries(torch.arange(row_offset + start, row_offset + stop), k, s, seed)
        contributions = X[:, start:stop].to(acc)[:, :, None] * values.to(X.device, acc)[None]
        out.index_add_(1, columns.reshape(-1).to(X.device), contributions.reshape(B, -1))
    return out


def _compiled(backend: str, X, k, s, seed, row_offset, out):
    """Backends "cpu" / "cuda": the C++ / CUDA kernel (csrc/*/project_sparse.*) adds X R into ``out``."""
    lib, stream = backends.library(backend)
    code = backends.dtype_code(X, "X", backend)
    lib.project_sparse(
        X.data_ptr(), code, X.shape[0], X.shape[1], X.stride(0), row_offset, k, s, seed, out.data_ptr(),
        stream(X.device),
    )
    return out


def _triton(*args):
    """Backend "triton": kernels/project_sparse.py (Triton is optional, so it is imported on use)."""
    from airtrace.kernels.project_sparse import project_sparse as kernel

    return kernel(*args)


IMPLEMENTATIONS = backends.implementations(reference, _compiled, _triton)


@torch.library.custom_op("airtrace::project_sparse", mutates_args=())
def torch_op(X: torch.Tensor, k: int, s: int, seed: int, row_offset: int = 0, backend: str = "auto") -> torch.Tensor:
    """``out = X @ R[row_offset : row_offset + p]``, R sparse (s nonzeros ±1/sqrt(s) per row), hashed: (B, p) -> (B, k).

    See :func:`project_sparse` (here X is one (B, p) tensor, not a list of blocks).
    """
    return project_sparse(X, k, s, seed, row_offset=row_offset, backend=backend)


@torch_op.register_fake
def _(X, k, s, seed, row_offset=0, backend="auto"):
    return X.new_empty((X.shape[0], k), dtype=accumulation_dtype(X.dtype))
