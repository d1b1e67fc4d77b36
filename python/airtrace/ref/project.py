"""Reference projections: factored (LoGra) and dense implicit-matrix (TRAK)."""

from __future__ import annotations

import torch

from airtrace.ref.hash import dense_entries


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (the exact reference); everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def project_factored(
    A: torch.Tensor, G: torch.Tensor, P_in: torch.Tensor, P_out: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """out[b] = sum_t m[b,t] (G[b,t] P_out)^T (A[b,t] P_in), shape (B, k_out, k_in)."""
    acc = accumulation_dtype(A.dtype)
    a_proj = A.to(acc) @ P_in.to(acc)  # (B, T, k_in)
    g_proj = G.to(acc) @ P_out.to(acc)  # (B, T, k_out)
    if mask is not None:
        g_proj = g_proj * mask.to(acc)[:, :, None]
    return g_proj.transpose(1, 2) @ a_proj


def project_dense(
    X: torch.Tensor,
    k: int,
    seed: int,
    kind: str = "rademacher",
    row_offset: int = 0,
    out: torch.Tensor | None = None,
    rows_per_chunk: int = 4096,
) -> torch.Tensor:
    """out[b, c] (+)= sum_i X[b, i] R[row_offset + i, c] with R from ``dense_entries``.

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
