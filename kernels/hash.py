"""Counter-based projection entries as Triton device functions.

The same uint32 recipe as ``csrc/include/airtrace/hash.h`` and
``airtrace.ops.hash``: Rademacher entries are bit-identical to the reference,
Gaussian entries agree to fp32 rounding.
"""

import triton
import triton.language as tl


@triton.jit
def mix32(x):
    """lowbias32 on uint32: x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def row_key(skey, rows):
    """rkey = mix32(mix32(skey ^ hi32(r)) ^ lo32(r)) for int64 rows r >= 0."""
    return mix32(mix32(((rows >> 32) ^ skey).to(tl.uint32)) ^ rows.to(tl.uint32))


@triton.jit
def col_key(cols):
    """ckey = mix32(c * 0x9e3779b9 + 0x632be5ab) for uint32 columns c."""
    return mix32(cols * 0x9E3779B9 + 0x632BE5AB)


@triton.jit
def rademacher(bits):
    """+1.0 or -1.0 from the top bit of ``bits``: that bit becomes the sign of 1.0f."""
    return ((bits & 0x80000000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def box_muller(bits1, bits2):
    """(r cos 2 pi u2, r sin 2 pi u2), r = sqrt(-2 ln u1), u1 = ((bits1 >> 8) + 1) 2^-24, u2 = (bits2 >> 8) 2^-24.

    The angle is reduced exactly to a quarter turn q plus x in [-pi/4, pi/4],
    so the result is accurate to fp32 rounding for every u2.
    """
    u1 = ((bits1 >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08
    radius = tl.sqrt_rn(-2.0 * tl.log(u1))
    turns = (bits2 >> 8).to(tl.float32) * 2.384185791015625e-07  # 4 u2 in [0, 4), exact
    q = tl.floor(turns + 0.5)
    x = (turns - q) * 1.5707963267948966
    quadrant = q.to(tl.int32)
    cos_x, sin_x = tl.cos(x), tl.sin(x)
    odd = (quadrant & 1) != 0
    cos_q = tl.where(odd, sin_x, cos_x)
    sin_q = tl.where(odd, cos_x, sin_x)
    cos_t = tl.where(((quadrant + 1) & 2) != 0, -cos_q, cos_q)
    sin_t = tl.where((quadrant & 2) != 0, -sin_q, sin_q)
    return radius * cos_t, radius * sin_t
