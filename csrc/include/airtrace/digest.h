// 128-bit content digest of byte rows, identical on every backend (the model fingerprint, example hashes).
//
// A row of L bytes, zero-padded to a multiple of 8, is read as stripes s = 0, 1, ... of two little-endian
// uint32 words (lo_s, hi_s); blocks of kDigestStripes stripes (8 KiB), the last one possibly short.
// In block b, with t the stripe's place in the block and c = t mod 4 its class:
//   P_c = sum (lo ^ K[2t]) * (hi ^ K[2t+1])   (32 x 32 -> 64-bit products), K[i] = mix32(i ^ 0x9e3779b9)
//   R_c = sum (hi << 32 | lo)                   (the raw stripe)
//   x_b = fmix64 chain of (b ^ kSeedX, P_0, R_0, ..., P_3, R_3),  y_b = the same from b ^ kSeedY with R_c before P_c
// digest = (fmix64(sum_b x_b ^ L), fmix64(sum_b y_b ^ fmix64(L ^ kSeedL))); every sum is mod 2^64.
// Sums commute, so any split of the stripes over threads or GPU blocks gives the same bits.
// The torch reference (python/airtrace/ops/digest.py) and kernels/digest.py implement the same recipe.
#pragma once
#include "airtrace/common.h"
#include "airtrace/hash.h"

namespace airtrace {

constexpr int64_t kDigestStripes = 1024;  // stripes (8 bytes each) per block
constexpr uint64_t kDigestSeedX = 0x243f6a8885a308d3ULL;
constexpr uint64_t kDigestSeedY = 0x13198a2e03707344ULL;
constexpr uint64_t kDigestSeedL = 0xa4093822299f31d0ULL;

// MurmurHash3's 64-bit finaliser: a bijection on uint64 with full avalanche.
AIRTRACE_HD uint64_t fmix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}

// K[i]: the key of word i of a block.
AIRTRACE_HD uint32_t digest_key(uint32_t i) { return mix32(i ^ 0x9e3779b9U); }

// The product term of one stripe at word offset 2t of its block.
AIRTRACE_HD uint64_t digest_product(uint32_t lo, uint32_t hi, uint32_t t) {
  return static_cast<uint64_t>(lo ^ digest_key(2 * t)) * static_cast<uint64_t>(hi ^ digest_key(2 * t + 1));
}

// (x_b, y_b) of block b from its class sums P[4], R[4].
AIRTRACE_HD void digest_block(uint64_t b, const uint64_t P[4], const uint64_t R[4], uint64_t* x, uint64_t* y) {
  uint64_t hx = fmix64(b ^ kDigestSeedX), hy = fmix64(b ^ kDigestSeedY);
  for (int c = 0; c < 4; ++c) {
    hx = fmix64(fmix64(hx ^ P[c]) ^ R[c]);
    hy = fmix64(fmix64(hy ^ R[c]) ^ P[c]);
  }
  *x = hx;
  *y = hy;
}

// The row digest from the block sums and the row's byte length.
AIRTRACE_HD void digest_finish(uint64_t sum_x, uint64_t sum_y, uint64_t length, uint64_t* out) {
  out[0] = fmix64(sum_x ^ length);
  out[1] = fmix64(sum_y ^ fmix64(length ^ kDigestSeedL));
}

// out (rows, 2) = the digests of `rows` rows of `row_bytes` bytes each, row r at data + r * row_bytes.
void digest_cpu(const void* data, int64_t rows, int64_t row_bytes, uint64_t* out);

// Same contract on device pointers, enqueued on `stream` (a cudaStream_t).
void digest_cuda(const void* data, int64_t rows, int64_t row_bytes, uint64_t* out, void* stream);

}  // namespace airtrace
