// out[b] = Q_G [(Q_G^T G[b] Q_A) / (Lam + damping)] Q_A^T   (B, k_out, k_in), fp32 accumulation.
//
// Samples are split over OpenMP threads. Per sample, four register-blocked GEMMs run on two
// thread-local (k_out, ld) buffers X, Y whose rows are padded with zeros to ld, a multiple of kLanes:
//   X = G[b] (as fp32),  Y = Q_G^T X,  X = (Y Q_A) / (Lam + damping),  Y = Q_G X,  out[b] = Y Q_A^T,
// so the rotated intermediate stays in the thread's cache. Q_G^T, Q_A, Q_A^T and Lam + damping are
// laid out once per call with the same padding (Lam + damping padded with ones, so padding stays 0).
#include "airtrace/precondition.h"

#include <algorithm>
#include <cstring>

#include "convert.h"
#include "parallel.h"
#include "variant.h"

namespace airtrace::AIRTRACE_ISA {
namespace {

// Register blocks of kRows rows x up to kMaxVecs vectors of kLanes floats, a vector being one native
// register (GCC/Clang vector extension).
#if defined(__AVX512F__)
constexpr int kLanes = 16, kRows = 6;  // 12 of 32 zmm registers accumulate
#elif defined(__AVX__)
constexpr int kLanes = 8, kRows = 6;  // 12 of 16 ymm registers accumulate
#else
constexpr int kLanes = 4, kRows = 4;  // 8 of 16 xmm registers accumulate
#endif
constexpr int kMaxVecs = 2;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

constexpr int64_t kParallelFlops = 1 << 20;  // below this much work one thread beats a fork/join

int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// acc[r][v] = sum_{k<K} a[r * lda + k] * b[k * ldb + v * kLanes : (v + 1) * kLanes] for r < MR, v < NV.
template <int MR, int NV>
inline void micro_block(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K,
                        Vec (&acc)[kRows][kMaxVecs]) {
  Vec sum[MR][NV] = {};
  for (int64_t k = 0; k < K; ++k) {
    Vec bk[NV];
    for (int v = 0; v < NV; ++v) bk[v] = load(b + k * ldb + v * kLanes);
    for (int r = 0; r < MR; ++r) {
      const float ar = a[r * lda + k];
      for (int v = 0; v < NV; ++v) sum[r][v] += ar * bk[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = sum[r][v];
}

// The micro_block instantiation for `rows` (1..kRows) rows and NV vectors.
template <int NV, int MR = kRows>
inline void micro_rows(int64_t rows, const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K,
                       Vec (&acc)[kRows][kMaxVecs]) {
  if constexpr (MR > 1) {
    if (rows < MR) return micro_rows<NV, MR - 1>(rows, a, lda, b, ldb, K, acc);
  }
  micro_block<MR, NV>(a, lda, b, ldb, K, acc);
}

// c = a (m, K; row stride lda) . b (K, ldb) in register blocks of at most kRows x kMaxVecs vectors;
// each row of a block goes to store(i, j, values, n): the n = vecs * kLanes values of row i from column j.
// ldb is a multiple of kLanes and b is zero past its real width, so no block crosses a row end.
template <typename Store>
void gemm(const float* a, int64_t lda, int64_t m, const float* b, int64_t ldb, int64_t K, Store&& store) {
  Vec acc[kRows][kMaxVecs];
  float values[kMaxVecs * kLanes];
  for (int64_t i = 0; i < m; i += kRows) {
    const int64_t rows = std::min<int64_t>(kRows, m - i);
    const float* ai = a + i * lda;
    for (int64_t j = 0; j < ldb;) {
      const int vecs = std::min<int64_t>(kMaxVecs, (ldb - j) / kLanes);
      if (vecs == 2) {
        micro_rows<2>(rows, ai, lda, b + j, ldb, K, acc);
      } else {
        micro_rows<1>(rows, ai, lda, b + j, ldb, K, acc);
      }
      for (int64_t r = 0; r < rows; ++r) {
        std::memcpy(values, acc[r], vecs * sizeof(Vec));
        store(i + r, j, values, vecs * kLanes);
      }
      j += vecs * kLanes;
    }
  }
}

// (rows, cols) row-major src (transposed first when `transpose`) copied into a (rows, ld) panel
// filled with `fill` past column cols.
cpu::Buffer<float> panel(const float* src, int64_t rows, int64_t cols, int64_t ld, bool transpose, float fill) {
  cpu::Buffer<float> p(rows * ld, fill);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) p[r * ld + c] = transpose ? src[c * rows + r] : src[r * cols + c];
  return p;
}

}  // namespace

void precondition_cpu(const void* G, DType dtype, const float* Q_G, const float* Q_A, const float* Lam,
                      float damping, int64_t B, int64_t k_out, int64_t k_in, float* out) {
  const int64_t ld = round_up(k_in, kLanes), size = k_out * k_in;
  const cpu::Buffer<float> QGt = panel(Q_G, k_out, k_out, k_out, true, 0.0f);
  const cpu::Buffer<float> QA = panel(Q_A, k_in, k_in, ld, false, 0.0f);
  const cpu::Buffer<float> QAt = panel(Q_A, k_in, k_in, ld, true, 0.0f);
  cpu::Buffer<float> D = panel(Lam, k_out, k_in, ld, false, 1.0f);
  for (int64_t i = 0; i < k_out; ++i)
    for (int64_t j = 0; j < k_in; ++j) D[i * ld + j] += damping;
  const int64_t flops = 4 * B * size * (k_out + k_in);
  cpu::Buffer<cpu::Buffer<float>> scratch = cpu::per_thread([&] { return cpu::Buffer<float>(2 * k_out * ld, 0.0f); });
#pragma omp parallel if (flops >= kParallelFlops)
  {
    float* const X = scratch[cpu::thread_index()].data();
    float* const Y = X + k_out * ld;
    const auto into_Y = [&](int64_t i, int64_t j, const float* v, int n) { std::copy_n(v, n, Y + i * ld + j); };
    const auto divided_into_X = [&](int64_t i, int64_t j, const float* v, int n) {
      for (int l = 0; l < n; ++l) X[i * ld + j + l] = v[l] / D[i * ld + j + l];
    };
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t p = 0; p < k_out; ++p)
        cpu::load_row(cpu::element_ptr(G, dtype, b * size + p * k_in), dtype, k_in, X + p * ld);
      gemm(QGt.data(), k_out, k_out, X, ld, k_out, into_Y);
      gemm(Y, ld, k_out, QA.data(), ld, k_in, divided_into_X);
      gemm(Q_G, k_out, k_out, X, ld, k_out, into_Y);
      float* out_b = out + b * size;
      gemm(Y, ld, k_out, QAt.data(), ld, k_in, [&](int64_t i, int64_t j, const float* v, int n) {
        std::copy_n(v, std::min<int64_t>(n, k_in - j), out_b + i * k_in + j);
      });
    }
  }
}

}  // namespace airtrace::AIRTRACE_ISA
