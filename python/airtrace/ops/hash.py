"""The counter-based hash behind the implicit matrices of project_dense and project_sparse, in pure torch (the
reference recipe); imports only torch.

Emulates the uint32 arithmetic of ``csrc/include/airtrace/hash.h`` with int64
tensors, so every backend's implicit matrix can be checked value for value.
"""

from __future__ import annotations

import math

import torch

M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
COL_SALT = 0x632BE5AB
KINDS = ("rademacher", "gaussian")
MAX_SEED = 2**32
MAX_SPARSITY = 4


def check_seed(seed) -> int:
    """``seed`` if it is an int in [0, 2^32), else a ValueError naming it."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be an int in [0, 2^32), got {seed!r}")
    return seed


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32: x ^= x>>16; x *= 0x7feb352d; x ^= x>>15; x *= 0x846ca68b; x ^= x>>16."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _scalar(x: int) -> torch.Tensor:
    return torch.tensor([x & M32], dtype=torch.int64)


def seed_key(seed: int) -> torch.Tensor:
    return mix32(_scalar(seed ^ GOLDEN))


def row_key(skey: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """rkey = mix32(mix32(skey ^ hi32(r)) ^ lo32(r)) for int64 row indices."""
    hi = (rows >> 32) & M32
    lo = rows & M32
    return mix32(mix32(skey ^ hi) ^ lo)


def col_key(cols: torch.Tensor) -> torch.Tensor:
    """ckey = mix32(c * 0x9e3779b9 + 0x632be5ab) in uint32 arithmetic."""
    return mix32((_mul32(cols & M32, GOLDEN) + COL_SALT) & M32)


def entry_bits(rows: torch.Tensor, cols: torch.Tensor, seed: int) -> torch.Tensor:
    """bits(r, c) = mix32(rkey(r) ^ ckey(c)) as an int64 (len(rows), len(cols)) grid."""
    rk = row_key(seed_key(seed), rows.to(torch.int64))
    ck = col_key(cols.to(torch.int64))
    return mix32(rk[:, None] ^ ck[None, :])


def dense_entries(
    rows: torch.Tensor, k: int, seed: int, kind: str = "rademacher", dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Rows of the implicit (p, k) projection matrix, scaled by 1/sqrt(k).

    Args:
        rows: int64 row indices (any values in [0, 2^63)).
        k: number of columns.
        seed: 32-bit seed.
        kind: "rademacher" (+-1) or "gaussian" (Box-Muller on paired columns).
        dtype: result dtype; float64 gives the exact reference values.

    Returns:
        (len(rows), k) tensor of ``dtype``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    cols = torch.arange(k, dtype=torch.int64)
    scale = 1.0 / math.sqrt(k)
    if kind == "rademacher":
        bits = entry_bits(rows, cols, seed)
        sign = 1.0 - 2.0 * (bits >> 31).to(dtype)
        return sign * scale
    even = cols & ~1
    b1 = entry_bits(rows, even, seed)
    b2 = entry_bits(rows, even + 1, seed)
    u1 = ((b1 >> 8) + 1).to(dtype) * 2.0**-24
    u2 = (b2 >> 8).to(dtype) * 2.0**-24
    radius = torch.sqrt(-2.0 * torch.log(u1))
    theta = (2.0 * math.pi) * u2
    trig = torch.where((cols % 2 == 0)[None, :], torch.cos(theta), torch.sin(theta))
    return radius * trig * scale


def sparse_entries(rows: torch.Tensor, k: int, s: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The s nonzeros of rows of the implicit sparse (p, k) projection matrix (``hash.h``, "sparse").

    Hash j (0 <= j < s) of row r has ``bits = bits(r, j)`` (:func:`entry_bits`) and lands in
    its own block of columns, ``start_j = floor(j k / s)`` .. ``start_{j+1}``, at
    ``start_j + ((bits & 0x7fffffff) * size_j >> 31)``, with value ``(-1)^(bits >> 31) / sqrt(s)``.

    Args:
        rows: int64 row indices (any values in [0, 2^63)).
        k: number of columns (>= s).
        s: nonzeros per row, 1..4.
        seed: 32-bit seed.

    Returns:
        columns (len(rows), s) int64 and values (len(rows), s) float64.
    """
    bits = entry_bits(rows, torch.arange(s, dtype=torch.int64), seed)
    j = torch.arange(s, dtype=torch.int64)
    start = j * k // s
    size = (j + 1) * k // s - start
    columns = start + (((bits & 0x7FFFFFFF) * size) >> 31)
    values = (1.0 - 2.0 * (bits >> 31).to(torch.float64)) / math.sqrt(s)
    return columns, values
