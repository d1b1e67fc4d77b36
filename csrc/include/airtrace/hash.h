// Counter-based random projection entries, identical on every backend.
//
// R[r, c] for row r (uint64) and column c of a (p, k) matrix with seed s:
//   skey = mix32(s ^ 0x9e3779b9)
//   rkey = mix32(mix32(skey ^ hi32(r)) ^ lo32(r))
//   ckey = mix32(c * 0x9e3779b9 + 0x632be5ab)            (uint32 arithmetic)
//   bits(r, c) = mix32(rkey ^ ckey)
// rademacher: R = (bits >> 31 ? -1 : +1) / sqrt(k)
// gaussian:   with j = c & ~1, u1 = ((bits(r, j) >> 8) + 1) * 2^-24,
//             u2 = (bits(r, j + 1) >> 8) * 2^-24 (Box-Muller pair),
//             R = sqrt(-2 ln u1) * (c even ? cos : sin)(2 pi u2) / sqrt(k)
// The torch reference (python/airtrace/ref/hash.py) and the Triton kernels
// implement the same integer recipe.
#pragma once
#include "airtrace/common.h"

namespace airtrace {

enum class RandomKind : int { rademacher = 0, gaussian = 1 };

// lowbias32 mixer: a bijection on uint32 with good avalanche.
AIRTRACE_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

AIRTRACE_HD uint32_t seed_key(uint32_t seed) { return mix32(seed ^ 0x9e3779b9U); }

AIRTRACE_HD uint32_t row_key(uint32_t skey, uint64_t row) {
  return mix32(mix32(skey ^ static_cast<uint32_t>(row >> 32)) ^ static_cast<uint32_t>(row));
}

AIRTRACE_HD uint32_t col_key(uint32_t col) { return mix32(col * 0x9e3779b9U + 0x632be5abU); }

AIRTRACE_HD uint32_t entry_bits(uint32_t rkey, uint32_t ckey) { return mix32(rkey ^ ckey); }

// +1 or -1 from the top bit.
AIRTRACE_HD float rademacher_sign(uint32_t bits) { return (bits >> 31) ? -1.0f : 1.0f; }

// Uniforms of the Box-Muller pair: u1 in (0, 1], u2 in [0, 1); both exact in fp32.
AIRTRACE_HD float uniform_open0(uint32_t bits) { return static_cast<float>((bits >> 8) + 1u) * 5.9604644775390625e-08f; }
AIRTRACE_HD float uniform_open1(uint32_t bits) { return static_cast<float>(bits >> 8) * 5.9604644775390625e-08f; }

constexpr float kTwoPi = 6.28318530717958647692f;

}  // namespace airtrace
