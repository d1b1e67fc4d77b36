// out[b, col_j(r)] += sign_j(r) / sqrt(s) * X[b, i], r = row_offset + i, j < s (hash.h, "sparse").
//
// Rows of X (coordinates i) are split into one contiguous range per thread. Per chunk of kChunkRows
// coordinates a thread hashes each coordinate once into its s columns and signed weights (a loop the
// compiler vectorises for the variant's instruction set), converts X[:, chunk] to fp32 row by row,
// and scatters every element into its s columns of the thread's (B, k) accumulator, so the hash of
// a coordinate is shared by all B rows. Thread 0 accumulates into `out`, the others into partial sums
// that are added afterwards.
#include "airtrace/project_sparse.h"

#include <algorithm>
#include <cmath>

#include "convert.h"
#include "parallel.h"
#include "variant.h"

namespace airtrace::AIRTRACE_ISA {
namespace {

constexpr int64_t kChunkRows = 512;  // coordinates hashed and scattered per step

struct SparseProblem {
  const void* X;
  DType dtype;
  int64_t B, ldx, row_offset, k, s;
  uint32_t skey;
  float scale;  // 1 / sqrt(s)
  int64_t start[5];  // block starts of the s hashes, start[s] = k
};

// One thread's buffers: a chunk of one row of X in fp32, the chunk's s columns and weights, its row keys.
struct SparseScratch {
  cpu::Buffer<float> x, weight;
  cpu::Buffer<int64_t> column;
  cpu::Buffer<uint32_t> rkeys;
  explicit SparseScratch(int64_t s) : x(kChunkRows), weight(kChunkRows * s), column(kChunkRows * s), rkeys(kChunkRows) {}
};

// acc (B, k) += X[:, coordinates [begin, end)] R[row_offset + coordinates], chunk by chunk.
void project_rows(const SparseProblem& pr, int64_t begin, int64_t end, float* acc, SparseScratch& scratch) {
  cpu::Buffer<float>& x = scratch.x;
  cpu::Buffer<float>& weight = scratch.weight;
  cpu::Buffer<int64_t>& column = scratch.column;
  cpu::Buffer<uint32_t>& rkeys = scratch.rkeys;
  for (int64_t i0 = begin; i0 < end; i0 += kChunkRows) {
    const int64_t rows = std::min(kChunkRows, end - i0);
    for (int64_t r = 0; r < rows; ++r) rkeys[r] = row_key(pr.skey, static_cast<uint64_t>(pr.row_offset + i0 + r));
    for (int64_t j = 0; j < pr.s; ++j) {
      const int64_t start = pr.start[j], size = pr.start[j + 1] - pr.start[j];
      const uint32_t ckey = col_key(static_cast<uint32_t>(j));
      for (int64_t r = 0; r < rows; ++r) {
        const uint32_t bits = entry_bits(rkeys[r], ckey);
        column[j * kChunkRows + r] = sparse_column(bits, start, size);
        weight[j * kChunkRows + r] = rademacher_sign(bits) * pr.scale;
      }
    }
    for (int64_t b = 0; b < pr.B; ++b) {
      cpu::load_row(cpu::element_ptr(pr.X, pr.dtype, b * pr.ldx + i0), pr.dtype, rows, x.data());
      float* row = acc + b * pr.k;
      for (int64_t j = 0; j < pr.s; ++j) {
        const int64_t* col = column.data() + j * kChunkRows;
        const float* w = weight.data() + j * kChunkRows;
        for (int64_t r = 0; r < rows; ++r) row[col[r]] += w[r] * x[r];
      }
    }
  }
}

}  // namespace

void project_sparse_cpu(const void* X, DType dtype, int64_t B, int64_t p, int64_t ldx, int64_t row_offset,
                        int64_t k, int64_t s, uint32_t seed, float* out) {
  if (B == 0 || p == 0) return;
  SparseProblem pr{X, dtype, B, ldx, row_offset, k, s, seed_key(seed),
                   static_cast<float>(1.0 / std::sqrt(static_cast<double>(s))), {}};
  for (int64_t j = 0; j <= s; ++j) pr.start[j] = sparse_block_start(j, k, s);
  cpu::share_and_sum(p, B * k, out, [&] { return SparseScratch(s); },
                     [&](int64_t begin, int64_t end, float* acc, SparseScratch& scratch) {
                       project_rows(pr, begin, end, acc, scratch);
                     });
}

}  // namespace airtrace::AIRTRACE_ISA
