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
// sparse (project_sparse, s nonzeros per row r, hash j = 0..s-1 in its own block of columns):
//             bits_j = bits(r, j); start_j = floor(j k / s), size_j = start_{j+1} - start_j,
//             col_j = start_j + (((bits_j & 0x7fffffff) * size_j) >> 31)      (uint64 product),
//             R[r, col_j] = (bits_j >> 31 ? -1 : +1) / sqrt(s), every other entry of row r 0
// The torch reference (python/airtrace/ops/hash.py) and the Triton kernels
// (kernels/hash.py) implement the same integer recipe.
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

// Column of hash j of a sparse row (see the top): the block [start, start + size) scaled by the low 31 bits.
AIRTRACE_HD int64_t sparse_column(uint32_t bits, int64_t start, int64_t size) {
  return start + static_cast<int64_t>((static_cast<uint64_t>(bits & 0x7fffffffu) * static_cast<uint64_t>(size)) >> 31);
}

// First column of hash j's block of the k columns: floor(j k / s).
AIRTRACE_HD int64_t sparse_block_start(int64_t j, int64_t k, int64_t s) { return j * k / s; }

constexpr float kTwoPi = 6.28318530717958647692f;

}  // namespace airtrace
