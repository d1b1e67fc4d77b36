// out[b, col_j(r)] += sign_j(r) / sqrt(s) * X[b, i], r = row_offset + i, j < s (hash.h, "sparse").
//
// A 2-D grid: each thread owns one coordinate i (blockIdx.x, threadIdx.x) and one tile of kBatchTile
// rows of X (blockIdx.y). It hashes its coordinate once into s columns and signed weights, then for
// every row b of its tile atomically adds the weighted X[b, i] into those s columns of `out`. Reads
// of X are coalesced across the threads of a warp (consecutive i); the atomics spread over k columns.
#include <cmath>

#include "airtrace/project_sparse.h"
#include "cuda_utils.cuh"

namespace airtrace {
namespace {

constexpr int kThreads = 256;
constexpr int kBatchTile = 16;

struct SparseArgs {
  int64_t B, p, ldx, row_offset, k, s;
  uint32_t skey;
  float scale;       // 1 / sqrt(s)
  int64_t start[5];  // block starts of the s hashes, start[s] = k
  float* out;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) project_sparse_kernel(const T* X, SparseArgs args) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= args.p) return;
  const uint32_t rkey = row_key(args.skey, static_cast<uint64_t>(args.row_offset + i));
  int64_t column[4];
  float weight[4];
  for (int64_t j = 0; j < args.s; ++j) {
    const uint32_t bits = entry_bits(rkey, col_key(static_cast<uint32_t>(j)));
    column[j] = sparse_column(bits, args.start[j], args.start[j + 1] - args.start[j]);
    weight[j] = rademacher_sign(bits) * args.scale;
  }
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * kBatchTile;
  const int64_t b1 = min(args.B, b0 + kBatchTile);
  for (int64_t b = b0; b < b1; ++b) {
    const float x = gpu::to_float(X[b * args.ldx + i]);
    if (x == 0.0f) continue;
    float* row = args.out + b * args.k;
    for (int64_t j = 0; j < args.s; ++j) atomicAdd(row + column[j], weight[j] * x);
  }
}

}  // namespace

void project_sparse_cuda(const void* X, DType dtype, int64_t B, int64_t p, int64_t ldx, int64_t row_offset,
                         int64_t k, int64_t s, uint32_t seed, float* out, void* stream) {
  if (B == 0 || p == 0) return;
  const gpu::DeviceGuard guard(out);
  SparseArgs args{B, p, ldx, row_offset, k, s, seed_key(seed),
                  static_cast<float>(1.0 / std::sqrt(static_cast<double>(s))), {}, out};
  for (int64_t j = 0; j <= s; ++j) args.start[j] = sparse_block_start(j, k, s);
  const dim3 grid(gpu::grid_size(gpu::ceil_div(p, kThreads), "project_sparse_kernel"),
                  static_cast<unsigned>(gpu::ceil_div(B, kBatchTile)));
  gpu::dispatch_dtype(dtype, [&](auto tag) {
    using Elem = typename decltype(tag)::type;
    project_sparse_kernel<Elem><<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const Elem*>(X), args);
  });
  gpu::check_launch("project_sparse_kernel");
}

}  // namespace airtrace
