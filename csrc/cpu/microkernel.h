// Register-blocked fp32 GEMM micro-kernel shared by the CPU kernels.
//   c[i, j] (+)= sum_{kk<K} a[i][kk] * b[kk * ldb + j]      i < m, j < n, fp32 accumulation
// `a` is a list of m row pointers (each row K contiguous elements, fp32 or bf16), `b` an fp32
// row-major panel whose rows are readable up to the next multiple of 16 columns past n (pad
// with zeros). bf16 rows are read in place: each 32-bit pair of elements is broadcast once and
// split into two exact fp32 values in registers, so bf16 inputs need no conversion pass.
#pragma once
#include <cstdint>
#include <cstring>

#include "convert.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace airtrace::AIRTRACE_ISA::cpu {

constexpr int kLanes = 16;     // floats per vector (one zmm register)
constexpr int kMaxPanel = 64;  // columns per micro-kernel call (4 vectors)

// Rows per micro-kernel call for NV vectors of columns: MR * NV accumulators fit 32 registers.
constexpr int max_rows(int NV) { return NV == 1 ? 8 : NV == 2 ? 12 : NV == 3 ? 8 : 6; }

inline float to_float(float x) { return x; }
inline float to_float(Bf16 x) { return bf16_to_float(x.bits); }

#if defined(__AVX512F__)

// GCC keeps the accumulator array in registers only when these loops are fully unrolled.
#define AIRTRACE_UNROLL _Pragma("GCC unroll 16")

// c[i, 0:ncols] (+)= acc[i]; columns >= ncols left untouched.
template <int MR, int NV>
inline void store_tile(const __m512* acc, float* c, int64_t ldc, int ncols, bool accumulate) {
  const int tail = ncols - (NV - 1) * kLanes;
  const __mmask16 last = static_cast<__mmask16>(tail >= kLanes ? 0xffff : (1u << tail) - 1u);
  AIRTRACE_UNROLL for (int i = 0; i < MR; ++i) {
    AIRTRACE_UNROLL for (int v = 0; v < NV; ++v) {
      float* dst = c + i * ldc + v * kLanes;
      const __mmask16 m = v == NV - 1 ? last : static_cast<__mmask16>(0xffff);
      __m512 r = acc[i * NV + v];
      if (accumulate) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(m, dst));
      _mm512_mask_storeu_ps(dst, m, r);
    }
  }
}

// One MR x (16 NV) tile of fp32 rows: c (+)= a[0:MR] . b.
template <int MR, int NV>
inline void micro_tile(const float* const* a, const float* b, int64_t ldb, int64_t K, float* c, int64_t ldc,
                       int ncols, bool accumulate) {
  const float* row[MR];
  __m512 acc[MR * NV];
  AIRTRACE_UNROLL for (int i = 0; i < MR; ++i) row[i] = a[i];
  AIRTRACE_UNROLL for (int i = 0; i < MR * NV; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < K; ++kk) {
    __m512 bv[NV];
    AIRTRACE_UNROLL for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + kk * ldb + v * kLanes);
    AIRTRACE_UNROLL for (int i = 0; i < MR; ++i) {
      const __m512 ai = _mm512_set1_ps(row[i][kk]);
      AIRTRACE_UNROLL for (int v = 0; v < NV; ++v) acc[i * NV + v] = _mm512_fmadd_ps(ai, bv[v], acc[i * NV + v]);
    }
  }
  store_tile<MR, NV>(acc, c, ldc, ncols, accumulate);
}

// The same tile for bf16 rows: steps kk, kk + 1 share one 32-bit broadcast per row, whose low
// and high halves shifted into the top of each lane are the fp32 values of a[i][kk], a[i][kk + 1].
template <int MR, int NV>
inline void micro_tile(const Bf16* const* a, const float* b, int64_t ldb, int64_t K, float* c, int64_t ldc,
                       int ncols, bool accumulate) {
  const Bf16* row[MR];
  __m512 acc[MR * NV];
  AIRTRACE_UNROLL for (int i = 0; i < MR; ++i) row[i] = a[i];
  AIRTRACE_UNROLL for (int i = 0; i < MR * NV; ++i) acc[i] = _mm512_setzero_ps();
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t kk = 0; kk + 1 < K; kk += 2) {
    __m512 b_even[NV], b_odd[NV];
    AIRTRACE_UNROLL for (int v = 0; v < NV; ++v) {
      b_even[v] = _mm512_loadu_ps(b + kk * ldb + v * kLanes);
      b_odd[v] = _mm512_loadu_ps(b + (kk + 1) * ldb + v * kLanes);
    }
    AIRTRACE_UNROLL for (int i = 0; i < MR; ++i) {
      int32_t pair;
      std::memcpy(&pair, row[i] + kk, sizeof pair);
      const __m512i both = _mm512_set1_epi32(pair);
      const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(both, 16));
      const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(both, high_half));
      AIRTRACE_UNROLL for (int v = 0; v < NV; ++v) {
        acc[i * NV + v] = _mm512_fmadd_ps(even, b_even[v], acc[i * NV + v]);
        acc[i * NV + v] = _mm512_fmadd_ps(odd, b_odd[v], acc[i * NV + v]);
      }
    }
  }
  if (K % 2 == 1) {
    const float* b_last = b + (K - 1) * ldb;
    AIRTRACE_UNROLL for (int i = 0; i < MR; ++i) {
      const __m512 ai = _mm512_set1_ps(to_float(row[i][K - 1]));
      AIRTRACE_UNROLL for (int v = 0; v < NV; ++v) {
        acc[i * NV + v] = _mm512_fmadd_ps(ai, _mm512_loadu_ps(b_last + v * kLanes), acc[i * NV + v]);
      }
    }
  }
  store_tile<MR, NV>(acc, c, ldc, ncols, accumulate);
}

#undef AIRTRACE_UNROLL

#else

// Portable version of the same tile (fp32 or bf16 rows); the compiler vectorises the j loops.
template <int MR, int NV, typename T>
inline void micro_tile(const T* const* a, const float* b, int64_t ldb, int64_t K, float* c, int64_t ldc,
                       int ncols, bool accumulate) {
  constexpr int NR = NV * kLanes;
  float acc[MR][NR] = {};
  for (int64_t kk = 0; kk < K; ++kk) {
    for (int i = 0; i < MR; ++i) {
      const float ai = to_float(a[i][kk]);
      for (int j = 0; j < NR; ++j) acc[i][j] += ai * b[kk * ldb + j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < ncols; ++j) c[i * ldc + j] = (accumulate ? c[i * ldc + j] : 0.0f) + acc[i][j];
}

#endif

// Dispatches m (1..MR) rows to the micro_tile instantiation with exactly m rows.
template <int NV, int MR, typename T>
inline void micro_rows(int64_t m, const T* const* a, const float* b, int64_t ldb, int64_t K, float* c,
                       int64_t ldc, int ncols, bool accumulate) {
  if constexpr (MR > 0) {
    if (m == MR) return micro_tile<MR, NV>(a, b, ldb, K, c, ldc, ncols, accumulate);
    micro_rows<NV, MR - 1>(m, a, b, ldb, K, c, ldc, ncols, accumulate);
  }
}

// All m rows against one panel of ncols <= 16 NV columns, in near-equal row blocks.
template <int NV, typename T>
inline void gemm_panel(const T* const* a, int64_t m, const float* b, int64_t ldb, int64_t K, float* c, int64_t ldc,
                       int ncols, bool accumulate) {
  constexpr int MR = max_rows(NV);
  const int64_t blocks = (m + MR - 1) / MR;
  int64_t i = 0;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t rows = m / blocks + (blk < m % blocks ? 1 : 0);
    micro_rows<NV, MR>(rows, a + i, b, ldb, K, c + i * ldc, ldc, ncols, accumulate);
    i += rows;
  }
}

// c (m, n) (+)= a (m rows of K, T = float or Bf16) . b (K, n), panel by panel of at most 64 columns.
template <typename T>
inline void gemm(const T* const* a, int64_t m, const float* b, int64_t ldb, int64_t K, int64_t n, float* c,
                 int64_t ldc, bool accumulate) {
  for (int64_t j = 0; j < n; j += kMaxPanel) {
    const int ncols = static_cast<int>(n - j < kMaxPanel ? n - j : kMaxPanel);
    switch ((ncols + kLanes - 1) / kLanes) {
      case 1: gemm_panel<1>(a, m, b + j, ldb, K, c + j, ldc, ncols, accumulate); break;
      case 2: gemm_panel<2>(a, m, b + j, ldb, K, c + j, ldc, ncols, accumulate); break;
      case 3: gemm_panel<3>(a, m, b + j, ldb, K, c + j, ldc, ncols, accumulate); break;
      default: gemm_panel<4>(a, m, b + j, ldb, K, c + j, ldc, ncols, accumulate); break;
    }
  }
}

}  // namespace airtrace::AIRTRACE_ISA::cpu
