"""The op project_dense (TRAK projection by an implicit, never-stored random matrix): checks, float64 reference,
compiled/Triton dispatch and ``torch.ops.airtrace.project_dense``; imports ``airtrace.ops.backends``,
``airtrace.ops.hash``, ``airtrace.util`` and its kernels."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from airtrace.ops import backends
from airtrace.ops.backends import accumulation_dtype
from airtrace.ops.hash import KINDS, MAX_SEED, dense_entries
from airtrace.util.checks import check_offset, check_same_device, check_tensor, positive_int


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
        (B, k) float32 (float64 for float64 inputs); meta tensors give a meta result.
    """
    blocks = [X] if isinstance(X, torch.Tensor) else list(X)
    if not blocks:
        raise ValueError("X must be a tensor or a non-empty sequence of (B, p_i) tensors")
    for i, block in enumerate(blocks):
        check_tensor("X" if len(blocks) == 1 else f"X[{i}]", block, 2)
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
    row_offset = check_offset("row_offset", row_offset, sum(block.shape[1] for block in blocks))
    device = check_same_device(**{f"X[{i}]": b for i, b in enumerate(blocks)})
    out = torch.zeros(B, k, dtype=accumulation_dtype(dtype), device=device)
    if B == 0 or device.type == "meta":
        return out
    run = IMPLEMENTATIONS[backends.choose("project_dense", backend, device, dtype)]
    for block in blocks:
        if block.shape[1] > 0:
            run(block if block.stride(1) == 1 else block.contiguous(), k, seed, kind, row_offset, out)
        row_offset += block.shape[1]
    return out


def reference(
    X: torch.Tensor,
    k: int,
    seed: int,
    kind: str = "rademacher",
    row_offset: int = 0,
    out: torch.Tensor | None = None,
    rows_per_chunk: int = 4096,
) -> torch.Tensor:
    """Backend "torch": out[b, c] (+)= sum_i X[b, i] R[row_offset + i, c] with R from ``dense_entries``.

    The matrix is generated in chunks of ``rows_per_chunk`` rows, so memory is
    O(rows_per_chunk * k), but every entry is materialised once.
    """
    acc = accumulation_dtype(X.dtype)
    B, p = X.shape
    if out is None:
        out = torch.zeros(B, k, dtype=acc, device=X.device)
    for start in range(0, p, rows_per_chunk):
        stop = min(start + rows_per_chunk, p)
        rows = torch.arange(row_offset + start, row_offset + stop, dtype=torch.int64)
        R = dense_entries(rows, k, seed, kind, dtype=acc).to(X.device)
        out += X[:, start:stop].to(acc) @ R
    return out


def _compiled(backend: str, X, k, seed, kind, row_offset, out):
    """Backends "cpu" / "cuda": the C++ / CUDA kernel (csrc/*/project_dense.*) adds X R into ``out``."""
    lib, stream = backends.library(backend)
    code = backends.dtype_code(X, "X", backend)
    lib.project_dense(
        X.data_ptr(), code, X.shape[0], X.shape[1], X.stride(0), row_offset, k, seed,
        KINDS.index(kind), out.data_ptr(), stream(X.device),
    )
    return out


def _triton(*args):
    """Backend "triton": kernels/project_dense.py (Triton is optional, so it is imported on use)."""
    from airtrace.kernels.project_dense import project_dense as kernel

    return kernel(*args)


def fake(X, k, seed, kind="rademacher", row_offset=0, backend="auto"):
    """The result's shape, dtype and device without computing it (meta and fake tensors)."""
    return X.new_empty((X.shape[0], k), dtype=accumulation_dtype(X.dtype))


IMPLEMENTATIONS = backends.implementations(reference, _compiled, _triton)


@torch.library.custom_op("airtrace::project_dense", mutates_args=())
def torch_op(X: torch.Tensor, k: int, seed: int, kind: str = "rademacher", row_offset: int = 0,
             backend: str = "auto") -> torch.Tensor:
    """``out = X @ R[row_offset : row_offset + p]``, R hashed from (seed, row, col): (B, p) -> (B, k).

    See :func:`project_dense` (here X is one (B, p) tensor, not a list of blocks).
    """
    return project_dense(X, k, seed, kind, row_offset=row_offset, backend=backend)


torch_op.register_fake(fake)
