"""The op digest (128-bit content digest of the bytes of each row of a tensor, identical on every backend and device):
checks, torch reference, compiled/Triton dispatch and ``torch.ops.airtrace.digest``; imports ``airtrace.ops.backends``,
``airtrace.ops.hash`` and its kernels.

The recipe (``csrc/include/airtrace/digest.h``): a row of L bytes, zero-padded to a
multiple of 8, is cut into 8-byte stripes (lo, hi uint32 words) and blocks of
``STRIPES`` stripes. Per block b and class c = t mod 4 of the stripe's place t:
``P_c = Σ (lo ^ K[2t]) (hi ^ K[2t+1])`` (64-bit products) and ``R_c = Σ (hi << 32 | lo)``;
the block folds into (x_b, y_b) by a chain of fmix64; the digest is
``(fmix64(Σ x_b ^ L), fmix64(Σ y_b ^ fmix64(L ^ SEED_L)))``, sums mod 2^64. A sum does
not depend on the order of its terms, so threads and GPU blocks give the same bits.
It is a fast checksum against accidental change, not a cryptographic hash.
"""

from __future__ import annotations

import torch

from airtrace.ops import backends
from airtrace.ops.hash import mix32

STRIPES = 1024
"""Stripes (8 bytes each) per block."""
SEED_X, SEED_Y, SEED_L = 0x243F6A8885A308D3, 0x13198A2E03707344, 0xA4093822299F31D0
_FMIX = (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53)
_CHUNK_BLOCKS = 64  # blocks the reference processes at a time (bounds its int64 temporaries)


def _signed(c: int) -> int:
    """The int64 with the bits of the uint64 ``c``."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 tensors holding uint64 bits."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def fmix64(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finaliser on uint64 bits held in int64 (products wrap mod 2^64 as in C):
    x ^= x >> 33; x *= 0xff51afd7ed558ccd; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53; x ^= x >> 33."""
    x = x ^ _shr(x, 33)
    x = x * _signed(_FMIX[0])
    x = x ^ _shr(x, 33)
    x = x * _signed(_FMIX[1])
    return x ^ _shr(x, 33)


def block_keys(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """K[2t] and K[2t+1] for t in [0, STRIPES): the keys of a block's lo and hi words, int64 (STRIPES,)."""
    keys = mix32(torch.arange(2 * STRIPES, dtype=torch.int64) ^ 0x9E3779B9).to(device)
    return keys[0::2], keys[1::2]


def fold_blocks(blocks: torch.Tensor, P: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_b, y_b) of blocks ``blocks`` (nb,) int64 from their class sums P, R (..., nb, 4) -> two (..., nb)."""
    x = fmix64(blocks ^ _signed(SEED_X)).expand(P.shape[:-1])
    y = fmix64(blocks ^ _signed(SEED_Y)).expand(P.shape[:-1])
    for c in range(4):
        x = fmix64(fmix64(x ^ P[..., c]) ^ R[..., c])
        y = fmix64(fmix64(y ^ R[..., c]) ^ P[..., c])
    return x, y


def finish(sum_x: torch.Tensor, sum_y: torch.Tensor, length: int) -> torch.Tensor:
    """The digests (rows, 2) from the block sums (rows,) and the row length in bytes."""
    L = torch.tensor(length, dtype=torch.int64, device=sum_x.device)
    return torch.stack([fmix64(sum_x ^ L), fmix64(sum_y ^ fmix64(L ^ _signed(SEED_L)))], dim=1)


def _as_byte_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) of any dtype -> (B, row bytes) uint8, the rows' bytes in row-major order."""
    rows = x.reshape(x.shape[0], -1).contiguous()
    if rows.shape[1] == 0:
        return torch.empty(rows.shape[0], 0, dtype=torch.uint8, device=x.device)
    return rows.view(torch.uint8) if rows.dtype != torch.uint8 else rows


def digest(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """128-bit content digests of the rows of ``x`` (the recipe in the module docstring).

    The digest of row b covers its bytes in row-major order and their count, so it
    depends on the values and the dtype's size, not on the device, strides or backend.

    Args:
        x: (B, ...) tensor of any dtype (at least 1-D); row b is ``x[b]``.
        backend: "auto", "torch", "cpu", "cuda" or "triton".

    Returns:
        (B, 2) int64 on x's device: the two uint64 halves' bits (see :func:`hexdigest`).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("x must have a leading row dimension (B, ...), got a 0-d tensor; use x.reshape(1)")
    if x.device.type == "meta":
        return fake(x)
    data = _as_byte_rows(x)
    run = IMPLEMENTATIONS[backends.choose("digest", backend, x.device, None)]
    return run(data)


def hexdigest(lanes: torch.Tensor) -> list[str]:
    """The digests (B, 2) as B strings of 32 lowercase hex digits."""
    return ["".join(f"{v & (2**64 - 1):016x}" for v in row) for row in lanes.tolist()]


def reference(data: torch.Tensor) -> torch.Tensor:
    """Backend "torch": the digests (B, 2) of the byte rows ``data`` (B, L) uint8, in int64 arithmetic that wraps
    like uint64 (blocks in chunks, so temporaries stay small)."""
    B, L = data.shape
    stripes = -(-L // 8)
    n_blocks = -(-stripes // STRIPES)
    k_lo, k_hi = block_keys(data.device)
    sum_x = torch.zeros(B, dtype=torch.int64, device=data.device)
    sum_y = torch.zeros_like(sum_x)
    for b0 in range(0, n_blocks, _CHUNK_BLOCKS):
        nb = min(_CHUNK_BLOCKS, n_blocks - b0)
        part = data[:, b0 * STRIPES * 8: (b0 + nb) * STRIPES * 8]
        padded = torch.zeros(B, nb * STRIPES * 8, dtype=torch.uint8, device=data.device)
        padded[:, : part.shape[1]] = part
        words = padded.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        lo, hi = words[:, 0::2].view(B, nb, STRIPES), words[:, 1::2].view(B, nb, STRIPES)
        place = b0 * STRIPES + torch.arange(nb * STRIPES, device=data.device).view(nb, STRIPES)
        valid = place < stripes
        prod = torch.where(valid, (lo ^ k_lo) * (hi ^ k_hi), 0)
        raw = (hi << 32) | lo
        P = prod.view(B, nb, STRIPES // 4, 4).sum(dim=2)
        R = raw.view(B, nb, STRIPES // 4, 4).sum(dim=2)
        x, y = fold_blocks(torch.arange(b0, b0 + nb, device=data.device), P, R)
        sum_x += x.sum(dim=1)
        sum_y += y.sum(dim=1)
    return finish(sum_x, sum_y, L)


def _compiled(backend: str, data: torch.Tensor) -> torch.Tensor:
    """Backends "cpu" / "cuda": the C++ / CUDA kernel (csrc/*/digest.*) on raw pointers."""
    lib, stream = backends.library(backend)
    out = torch.empty(data.shape[0], 2, dtype=torch.int64, device=data.device)
    if data.shape[0]:
        lib.digest(data.data_ptr(), data.shape[0], data.shape[1], out.data_ptr(), stream(data.device))
    return out


def _triton(data: torch.Tensor) -> torch.Tensor:
    """Backend "triton": kernels/digest.py (Triton is optional, so it is imported on use)."""
    from airtrace.kernels.digest import digest as kernel

    return kernel(data)


def fake(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """The result's shape, dtype and device without computing it (meta and fake tensors)."""
    return x.new_empty((x.shape[0], 2), dtype=torch.int64)


IMPLEMENTATIONS = backends.implementations(reference, _compiled, _triton)


@torch.library.custom_op("airtrace::digest", mutates_args=())
def torch_op(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """128-bit content digests of the rows of x: (B, ...) any dtype -> (B, 2) int64. See :func:`digest`."""
    return digest(x, backend=backend)


torch_op.register_fake(fake)
