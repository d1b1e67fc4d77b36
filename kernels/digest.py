"""Content digests of byte rows: one program per (row, 8 KiB block) folds the block into (x_b, y_b).

The recipe of ``csrc/include/airtrace/digest.h`` and ``airtrace.ops.digest``; the
block sums and the length are applied by the reference's own functions, so all
backends agree bit for bit.
"""

import torch
import triton
import triton.language as tl

from airtrace.kernels.hash import mix32
from airtrace.ops.digest import SEED_X, SEED_Y, STRIPES, finish

_SEED_X = tl.constexpr(SEED_X)
_SEED_Y = tl.constexpr(SEED_Y)


@triton.jit
def fmix64(x):
    """MurmurHash3's finaliser on uint64: x ^= x >> 33; x *= 0xff51afd7ed558ccd; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53; x ^= x >> 33."""
    x ^= x >> 33
    x *= 0xFF51AFD7ED558CCD
    x ^= x >> 33
    x *= 0xC4CEB9FE1A85EC53
    return x ^ (x >> 33)


@triton.jit
def _class_sum(v, cls, c):
    """Sum (mod 2^64) of the entries of v whose class is c."""
    return tl.sum(tl.where(cls == c, v, 0), axis=0)


@triton.jit
def _digest_blocks_kernel(words, xs, ys, stripes, blocks, STRIPES: tl.constexpr):
    """xs[r, b], ys[r, b] = the fold of block b of row r: P_c = sum (lo ^ K[2t]) (hi ^ K[2t+1]), R_c = sum hi << 32 | lo."""
    r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    t = tl.arange(0, STRIPES)
    place = b * STRIPES + t
    valid = place < stripes
    row = words + r * (2 * stripes)
    lo = tl.load(row + 2 * place, mask=valid, other=0).to(tl.uint32, bitcast=True)
    hi = tl.load(row + 2 * place + 1, mask=valid, other=0).to(tl.uint32, bitcast=True)
    k_lo = mix32((2 * t).to(tl.uint32) ^ 0x9E3779B9)
    k_hi = mix32((2 * t + 1).to(tl.uint32) ^ 0x9E3779B9)
    prod = tl.where(valid, (lo ^ k_lo).to(tl.uint64) * (hi ^ k_hi).to(tl.uint64), 0)
    raw = (hi.to(tl.uint64) << 32) | lo.to(tl.uint64)
    cls = t % 4
    x = fmix64(b.to(tl.uint64) ^ _SEED_X)
    y = fmix64(b.to(tl.uint64) ^ _SEED_Y)
    for c in tl.static_range(4):
        P = _class_sum(prod, cls, c)
        R = _class_sum(raw, cls, c)
        x = fmix64(fmix64(x ^ P) ^ R)
        y = fmix64(fmix64(y ^ R) ^ P)
    tl.store(xs + r * blocks + b, x.to(tl.int64, bitcast=True))
    tl.store(ys + r * blocks + b, y.to(tl.int64, bitcast=True))


def digest(data: torch.Tensor) -> torch.Tensor:
    """The digests (B, 2) int64 of the byte rows ``data`` (B, L) uint8; rows are padded to whole stripes here."""
    B, L = data.shape
    stripes = triton.cdiv(L, 8)
    blocks = triton.cdiv(stripes, STRIPES)
    xs = torch.zeros(B, blocks, dtype=torch.int64, device=data.device)
    ys = torch.zeros_like(xs)
    if B and blocks:
        padded = data if L == 8 * stripes else torch.nn.functional.pad(data, (0, 8 * stripes - L))
        words = padded.contiguous().view(torch.int32)
        _digest_blocks_kernel[(B, blocks)](words, xs, ys, stripes, blocks, STRIPES=STRIPES)
    return finish(xs.sum(dim=1), ys.sum(dim=1), L)
