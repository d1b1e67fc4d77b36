// out[b, c] += sum_i X[b, i] R[row_offset + i, c], R hashed from (seed, row, col) (hash.h).
//
// Rows of X are split into one contiguous range per thread. For each chunk of kChunkRows rows a
// thread converts X[:, chunk] to fp32 once, then for each block of kBlockCols columns generates
// the entries R[chunk, block] into an L1-resident buffer (row keys once per row, column keys
// cached for the whole call; 16 columns per vector) and multiplies every row of X by it with the
// GEMM micro-kernel, so each generated entry is used B times. Thread 0 accumulates into `out`,
// the others into partial sums that are added afterwards.
#include "airtrace/project_dense.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "convert.h"
#include "microkernel.h"
#include "parallel.h"
#include "variant.h"

namespace airtrace::AIRTRACE_ISA {
namespace {

constexpr int64_t kChunkRows = 96;   // rows of R per generated block
constexpr int64_t kBlockCols = 64;   // columns of R per generated block (2 Box-Muller units)
constexpr int64_t kPairUnit = 32;    // columns per Box-Muller unit: 16 pairs, one vector each

int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Column keys of columns [0, cols): in column order for rademacher; for gaussian each unit of
// 32 columns holds the 16 even-column keys, then the 16 odd-column keys (the two halves of
// its Box-Muller pairs).
cpu::Buffer<uint32_t> column_keys(int64_t cols, RandomKind kind) {
  cpu::Buffer<uint32_t> keys(cols);
  for (int64_t c = 0; c < cols; ++c) {
    int64_t slot = c;
    if (kind == RandomKind::gaussian) {
      const int64_t unit = c / kPairUnit, offset = c % kPairUnit;
      slot = unit * kPairUnit + (offset & 1) * (kPairUnit / 2) + offset / 2;
    }
    keys[slot] = col_key(static_cast<uint32_t>(c));
  }
  return keys;
}

// log_unit(x): Cephes-style ln x for x in (0, 1], x = (1 + f) 2^e with f in [sqrt(1/2) - 1, sqrt(2) - 1)
// and ln(1 + f) by a polynomial. cos_sin_turn(u): cos and sin of 2 pi u for u in [0, 1), with an
// exact reduction 4u = q + r (q the nearest integer) to x = r pi/2 in [-pi/4, pi/4], then
// polynomials and the quadrant q. Entries stay within 3e-7 relative of the float64 reference.
constexpr float kLogC[9] = {7.0376836292e-2f,  -1.1514610310e-1f, 1.1676998740e-1f,
                            -1.2420140846e-1f, 1.4249322787e-1f,  -1.6668057665e-1f,
                            2.0000714765e-1f,  -2.4999993993e-1f, 3.3333331174e-1f};
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kSqrt2 = 1.41421356237f;
// sin/cos on [-pi/4, pi/4] (Cephes sinf/cosf).
constexpr float kSin1 = -1.9515295891e-4f, kSin2 = 8.3321608736e-3f, kSin3 = -1.6666654611e-1f;
constexpr float kCos1 = 2.443315711809948e-5f, kCos2 = -1.388731625493765e-3f, kCos3 = 4.166664568298827e-2f;
constexpr float kHalfPi = 1.57079632679489662f;

#if defined(__AVX512F__)

// mix32 (hash.h) on 16 lanes.
__m512i mix32_v(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7feb352d));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(0x846ca68bu)));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

// log_unit on 16 lanes.
__m512 log_unit_v(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  __m512 e = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(127)));
  __m512 m = _mm512_castsi512_ps(
      _mm512_or_si512(_mm512_and_si512(bits, _mm512_set1_epi32(0x007fffff)), _mm512_set1_epi32(0x3f800000)));
  const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(kSqrt2), _CMP_GT_OQ);
  m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
  e = _mm512_mask_add_ps(e, big, e, _mm512_set1_ps(1.0f));
  const __m512 f = _mm512_sub_ps(m, _mm512_set1_ps(1.0f)), z = _mm512_mul_ps(f, f);
  __m512 y = _mm512_set1_ps(kLogC[0]);
  for (int i = 1; i < 9; ++i) y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(kLogC[i]));
  y = _mm512_mul_ps(_mm512_mul_ps(y, f), z);
  y = _mm512_fmadd_ps(_mm512_set1_ps(kLn2Lo), e, y);
  y = _mm512_fnmadd_ps(_mm512_set1_ps(0.5f), z, y);
  return _mm512_fmadd_ps(_mm512_set1_ps(kLn2Hi), e, _mm512_add_ps(f, y));
}

// cos_sin_turn on 16 lanes.
void cos_sin_turn_v(__m512 u, __m512* cos_out, __m512* sin_out) {
  const __m512 v = _mm512_mul_ps(_mm512_set1_ps(4.0f), u);
  const __m512 q = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 x = _mm512_mul_ps(_mm512_sub_ps(v, q), _mm512_set1_ps(kHalfPi)), z = _mm512_mul_ps(x, x);
  __m512 s = _mm512_fmadd_ps(_mm512_set1_ps(kSin1), z, _mm512_set1_ps(kSin2));
  s = _mm512_fmadd_ps(s, z, _mm512_set1_ps(kSin3));
  s = _mm512_fmadd_ps(_mm512_mul_ps(s, z), x, x);
  __m512 c = _mm512_fmadd_ps(_mm512_set1_ps(kCos1), z, _mm512_set1_ps(kCos2));
  c = _mm512_fmadd_ps(c, z, _mm512_set1_ps(kCos3));
  c = _mm512_fmadd_ps(_mm512_mul_ps(c, z), z, _mm512_fnmadd_ps(_mm512_set1_ps(0.5f), z, _mm512_set1_ps(1.0f)));
  const __m512i quadrant = _mm512_cvtps_epi32(q);
  const __m512i one = _mm512_set1_epi32(1), two = _mm512_set1_epi32(2);
  const __mmask16 swap = _mm512_test_epi32_mask(quadrant, one);
  const __m512 sin_q = _mm512_mask_blend_ps(swap, s, c), cos_q = _mm512_mask_blend_ps(swap, c, s);
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const __m512i sin_sign = _mm512_maskz_mov_epi32(_mm512_test_epi32_mask(quadrant, two), sign);
  const __m512i cos_sign = _mm512_maskz_mov_epi32(_mm512_test_epi32_mask(_mm512_add_epi32(quadrant, one), two), sign);
  *sin_out = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(sin_q), sin_sign));
  *cos_out = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(cos_q), cos_sign));
}

// E[r, 0:cols] = +-scale from the top bit of mix32(rkey[r] ^ ckey[c]); cols a multiple of 16.
void rademacher_block(const uint32_t* rkeys, int64_t rows, const uint32_t* ckeys, int64_t cols, float scale, float* E) {
  const int64_t vectors = cols / 16;
  __m512i ck[kBlockCols / 16];
  for (int64_t v = 0; v < vectors; ++v) ck[v] = _mm512_loadu_si512(ckeys + 16 * v);
  const __m512i magnitude = _mm512_set1_epi32(static_cast<int>(float_to_bits(scale)));
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  for (int64_t r = 0; r < rows; ++r) {
    const __m512i rk = _mm512_set1_epi32(static_cast<int>(rkeys[r]));
    for (int64_t v = 0; v < vectors; ++v) {
      const __m512i bits = mix32_v(_mm512_xor_si512(rk, ck[v]));
      _mm512_storeu_si512(E + r * kBlockCols + 16 * v, _mm512_ternarylogic_epi32(bits, sign, magnitude, 0xea));
    }
  }
}

// E[r, 0:cols] = scale * Box-Muller(bits(r, even col), bits(r, odd col)), 16 pairs per vector;
// cols a multiple of 32.
void gaussian_block(const uint32_t* rkeys, int64_t rows, const uint32_t* ckeys, int64_t cols, float scale, float* E) {
  const __m512i interleave_lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i interleave_hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512 step = _mm512_set1_ps(5.9604644775390625e-08f);  // 2^-24
  for (int64_t r = 0; r < rows; ++r) {
    const __m512i rk = _mm512_set1_epi32(static_cast<int>(rkeys[r]));
    for (int64_t unit = 0; unit < cols; unit += kPairUnit) {
      const __m512i b1 = mix32_v(_mm512_xor_si512(rk, _mm512_loadu_si512(ckeys + unit)));
      const __m512i b2 = mix32_v(_mm512_xor_si512(rk, _mm512_loadu_si512(ckeys + unit + 16)));
      const __m512i top1 = _mm512_add_epi32(_mm512_srli_epi32(b1, 8), _mm512_set1_epi32(1));
      const __m512 u1 = _mm512_mul_ps(_mm512_cvtepi32_ps(top1), step);  // uniform_open0
      const __m512 u2 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b2, 8)), step);  // uniform_open1
      const __m512 radius = _mm512_mul_ps(_mm512_sqrt_ps(_mm512_mul_ps(_mm512_set1_ps(-2.0f), log_unit_v(u1))),
                                          _mm512_set1_ps(scale));
      __m512 c, s;
      cos_sin_turn_v(u2, &c, &s);
      c = _mm512_mul_ps(radius, c);
      s = _mm512_mul_ps(radius, s);
      _mm512_storeu_ps(E + r * kBlockCols + unit, _mm512_permutex2var_ps(c, interleave_lo, s));
      _mm512_storeu_ps(E + r * kBlockCols + unit + 16, _mm512_permutex2var_ps(c, interleave_hi, s));
    }
  }
}

#else  // portable versions of the same functions

float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

float log_unit(float x) {
  const uint32_t bits = float_to_bits(x);
  float e = static_cast<float>(static_cast<int>(bits >> 23) - 127);
  float m = bits_to_float((bits & 0x007fffffu) | 0x3f800000u);
  if (m > kSqrt2) {
    m *= 0.5f;
    e += 1.0f;
  }
  const float f = m - 1.0f, z = f * f;
  float y = kLogC[0];
  for (int i = 1; i < 9; ++i) y = y * f + kLogC[i];
  y = y * f * z + kLn2Lo * e - 0.5f * z;
  return f + y + kLn2Hi * e;
}

void cos_sin_turn(float u, float* cos_out, float* sin_out) {
  const float v = 4.0f * u, q = std::nearbyint(v);
  const float x = (v - q) * kHalfPi, z = x * x;
  const float s = ((kSin1 * z + kSin2) * z + kSin3) * z * x + x;
  const float c = ((kCos1 * z + kCos2) * z + kCos3) * z * z - 0.5f * z + 1.0f;
  const int quadrant = static_cast<int>(q);
  const float sin_q = (quadrant & 1) ? c : s, cos_q = (quadrant & 1) ? s : c;
  *sin_out = (quadrant & 2) ? -sin_q : sin_q;
  *cos_out = ((quadrant + 1) & 2) ? -cos_q : cos_q;
}

void rademacher_block(const uint32_t* rkeys, int64_t rows, const uint32_t* ckeys, int64_t cols, float scale, float* E) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) E[r * kBlockCols + c] = rademacher_sign(entry_bits(rkeys[r], ckeys[c])) * scale;
}

void gaussian_block(const uint32_t* rkeys, int64_t rows, const uint32_t* ckeys, int64_t cols, float scale, float* E) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t unit = 0; unit < cols; unit += kPairUnit)
      for (int64_t m = 0; m < kPairUnit / 2; ++m) {
        const float u1 = uniform_open0(entry_bits(rkeys[r], ckeys[unit + m]));
        const float u2 = uniform_open1(entry_bits(rkeys[r], ckeys[unit + kPairUnit / 2 + m]));
        const float radius = std::sqrt(-2.0f * log_unit(u1)) * scale;
        float c, s;
        cos_sin_turn(u2, &c, &s);
        E[r * kBlockCols + unit + 2 * m] = radius * c;
        E[r * kBlockCols + unit + 2 * m + 1] = radius * s;
      }
}

#endif

struct DenseProblem {
  const void* X;
  DType dtype;
  int64_t B, ldx, row_offset, k;
  uint32_t skey;
  RandomKind kind;
  float scale;
  cpu::Buffer<uint32_t> ckeys;  // column_keys(round_up(k, kBlockCols), kind)
};

// One thread's buffers: a chunk of X in fp32 and its row pointers, a block of R, the chunk's row keys.
struct DenseScratch {
  cpu::Buffer<float> x, E;
  cpu::Buffer<const float*> x_rows;
  cpu::Buffer<uint32_t> rkeys;
  explicit DenseScratch(int64_t B) : x(B * kChunkRows), E(kChunkRows * kBlockCols), x_rows(B), rkeys(kChunkRows) {}
};

// acc (B, k) += X[:, rows [begin, end)] R[row_offset + rows], chunk by chunk.
void project_rows(const DenseProblem& pr, int64_t begin, int64_t end, float* acc, DenseScratch& s) {
  cpu::Buffer<float>& x = s.x;
  cpu::Buffer<float>& E = s.E;
  cpu::Buffer<const float*>& x_rows = s.x_rows;
  cpu::Buffer<uint32_t>& rkeys = s.rkeys;
  for (int64_t i0 = begin; i0 < end; i0 += kChunkRows) {
    const int64_t rows = std::min(kChunkRows, end - i0);
    for (int64_t b = 0; b < pr.B; ++b) {
      cpu::load_row(cpu::element_ptr(pr.X, pr.dtype, b * pr.ldx + i0), pr.dtype, rows, x.data() + b * kChunkRows);
      x_rows[b] = x.data() + b * kChunkRows;
    }
    for (int64_t r = 0; r < rows; ++r) rkeys[r] = row_key(pr.skey, static_cast<uint64_t>(pr.row_offset + i0 + r));
    for (int64_t c0 = 0; c0 < pr.k; c0 += kBlockCols) {
      const int64_t cols = std::min(kBlockCols, pr.k - c0);
      if (pr.kind == RandomKind::rademacher) {
        rademacher_block(rkeys.data(), rows, pr.ckeys.data() + c0, round_up(cols, cpu::kLanes), pr.scale, E.data());
      } else {
        gaussian_block(rkeys.data(), rows, pr.ckeys.data() + c0, round_up(cols, kPairUnit), pr.scale, E.data());
      }
      cpu::gemm(x_rows.data(), pr.B, E.data(), kBlockCols, rows, cols, acc + c0, pr.k, true);
    }
  }
}

}  // namespace

void project_dense_cpu(const void* X, DType dtype, int64_t B, int64_t p, int64_t ldx, int64_t row_offset,
                       int64_t k, uint32_t seed, RandomKind kind, float* out) {
  if (B == 0 || p == 0) return;
  const int64_t padded_k = round_up(k, kBlockCols);
  const DenseProblem pr{X, dtype, B, ldx, row_offset, k, seed_key(seed), kind,
                        static_cast<float>(1.0 / std::sqrt(static_cast<double>(k))), column_keys(padded_k, kind)};
  const int threads = cpu::max_threads();
  cpu::Buffer<float> partial((threads - 1) * B * k, 0.0f);
  cpu::Buffer<DenseScratch> scratch = cpu::per_thread([&] { return DenseScratch(B); });
#pragma omp parallel
  {
    const int t = cpu::thread_index();
    int64_t begin, end;
    cpu::thread_share(p, t, cpu::team_size(), &begin, &end);
    project_rows(pr, begin, end, t == 0 ? out : partial.data() + (t - 1) * B * k, scratch[t]);
  }
  for (int t = 1; t < threads; ++t)
    for (int64_t i = 0; i < B * k; ++i) out[i] += partial[(t - 1) * B * k + i];
}

}  // namespace airtrace::AIRTRACE_ISA
