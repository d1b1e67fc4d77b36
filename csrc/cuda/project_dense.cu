// out[b, c] += sum_i X[b, i] R[row_offset + i, c], R hashed from (seed, row, col) (hash.h).
//
// One thread block per (tile of kTileCols columns, tile of BT rows of X, slice of rows of R).
// Each thread owns one column pair (2c, 2c + 1), the unit of a Box-Muller pair. Per step the
// block stages kRows rows of X[b-tile] (fp32, transposed so a row of R meets BT values of X in
// one float4 sweep) and their row keys in shared memory; each thread then generates its two
// entries of every staged row in registers and uses them for all BT rows of X. Partial sums
// are scaled by 1/sqrt(k) and atomically added into `out`, which the caller accumulates into.
#include <algorithm>
#include <cmath>

#include "airtrace/project_dense.h"
#include "cuda_utils.cuh"

namespace airtrace {
namespace {

constexpr int kThreads = 128;
constexpr int kTileCols = 2 * kThreads;  // one column pair per thread
constexpr int kRows = 64;                // rows of X / R staged per step
constexpr int kMaxBatchTile = 32;

struct DenseArgs {
  int64_t B, p, ldx, row_offset, k;
  uint32_t skey;         // seed_key(seed)
  float scale;           // 1 / sqrt(k)
  int64_t col_tiles;     // ceil(k / kTileCols)
  int64_t batch_tiles;   // ceil(B / BT)
  int64_t rows_per_split;
  float* out;
};

// Unscaled entries R[r, c] * sqrt(k) for the even column c = 2j (e0) and c + 1 (e1) of row key rkey.
template <RandomKind kKind>
__device__ __forceinline__ void entry_pair(uint32_t rkey, uint32_t ckey_even, uint32_t ckey_odd, float& e0,
                                           float& e1) {
  const uint32_t bits_even = entry_bits(rkey, ckey_even), bits_odd = entry_bits(rkey, ckey_odd);
  if constexpr (kKind == RandomKind::rademacher) {
    e0 = rademacher_sign(bits_even);
    e1 = rademacher_sign(bits_odd);
  } else {
    // sqrt(-2 ln u1) (cos, sin)(2 pi u2); sincospif reduces the exact argument 2 u2 exactly.
    const float radius = sqrtf(-2.0f * logf(uniform_open0(bits_even)));
    float s, c;
    sincospif(2.0f * uniform_open1(bits_odd), &s, &c);
    e0 = radius * c;
    e1 = radius * s;
  }
}

// xs[r * kStride + b] = X[b0 + b, i0 + r] (0 outside X) and rkeys[r] = row_key(row_offset + i0 + r).
template <int BT, int kStride, typename T>
__device__ void stage_rows(const T* X, const DenseArgs& args, int64_t b0, int64_t i0, int rows, float* xs,
                           uint32_t* rkeys) {
  for (int e = threadIdx.x; e < BT * kRows; e += kThreads) {
    const int r = e % kRows, b = e / kRows;
    const bool inside = b0 + b < args.B && r < rows;
    xs[r * kStride + b] = inside ? gpu::to_float(X[(b0 + b) * args.ldx + i0 + r]) : 0.0f;
  }
  for (int r = threadIdx.x; r < rows; r += kThreads) {
    rkeys[r] = row_key(args.skey, static_cast<uint64_t>(args.row_offset + i0 + r));
  }
}

// out[b0 + b, c] += scale * sum_{i in slice} X[b0 + b, i] R'[row_offset + i, c] for this thread's c pair.
template <typename T, RandomKind kKind, int BT>
__global__ void __launch_bounds__(kThreads) project_dense_kernel(const T* X, DenseArgs args) {
  constexpr int kStride = BT + 4;  // padded, still float4-aligned
  __shared__ __align__(16) float xs[kRows * kStride];
  __shared__ uint32_t rkeys[kRows];

  const int64_t block = blockIdx.x;
  const int64_t col_tile = block % args.col_tiles;
  const int64_t batch_tile = (block / args.col_tiles) % args.batch_tiles;
  const int64_t split = block / args.col_tiles / args.batch_tiles;
  const int64_t c0 = col_tile * kTileCols + 2 * threadIdx.x;
  const int64_t b0 = batch_tile * BT;
  const uint32_t ckey_even = col_key(static_cast<uint32_t>(c0));
  const uint32_t ckey_odd = col_key(static_cast<uint32_t>(c0 + 1));

  float acc[BT][2] = {};
  const int64_t row_begin = split * args.rows_per_split;
  const int64_t row_end = min(args.p, row_begin + args.rows_per_split);
  for (int64_t i0 = row_begin; i0 < row_end; i0 += kRows) {
    const int rows = static_cast<int>(min(static_cast<int64_t>(kRows), row_end - i0));
    stage_rows<BT, kStride>(X, args, b0, i0, rows, xs, rkeys);
    __syncthreads();
    for (int r = 0; r < rows; ++r) {
      float e0, e1;
      entry_pair<kKind>(rkeys[r], ckey_even, ckey_odd, e0, e1);
      const float4* x4 = reinterpret_cast<const float4*>(xs + r * kStride);
#pragma unroll
      for (int v = 0; v < BT / 4; ++v) {
        const float4 x = x4[v];
        acc[4 * v + 0][0] += x.x * e0;
        acc[4 * v + 0][1] += x.x * e1;
        acc[4 * v + 1][0] += x.y * e0;
        acc[4 * v + 1][1] += x.y * e1;
        acc[4 * v + 2][0] += x.z * e0;
        acc[4 * v + 2][1] += x.z * e1;
        acc[4 * v + 3][0] += x.w * e0;
        acc[4 * v + 3][1] += x.w * e1;
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int b = 0; b < BT; ++b) {
    if (b0 + b >= args.B) break;
    float* row = args.out + (b0 + b) * args.k;
    if (c0 < args.k) atomicAdd(row + c0, args.scale * acc[b][0]);
    if (c0 + 1 < args.k) atomicAdd(row + c0 + 1, args.scale * acc[b][1]);
  }
}

// Rows of X per block tile: the smallest of 4, 8, 16, 32 covering B, else 32 (several tiles).
int batch_tile(int64_t B) {
  return B <= 4 ? 4 : (B <= 8 ? 8 : (B <= 16 ? 16 : kMaxBatchTile));
}

template <typename T, RandomKind kKind, int BT>
void launch(const T* X, DenseArgs args, cudaStream_t stream) {
  args.col_tiles = gpu::ceil_div(args.k, kTileCols);
  args.batch_tiles = gpu::ceil_div(args.B, BT);
  // Split the rows of R until the grid has about 8 blocks per SM, never below kRows rows per block.
  const int64_t base_blocks = args.col_tiles * args.batch_tiles;
  const int64_t row_steps = gpu::ceil_div(args.p, kRows);
  const int64_t wanted = std::clamp<int64_t>(gpu::ceil_div(8 * gpu::sm_count(), base_blocks), 1, row_steps);
  args.rows_per_split = gpu::ceil_div(row_steps, wanted) * kRows;
  const int64_t splits = gpu::ceil_div(args.p, args.rows_per_split);
  const unsigned grid = gpu::grid_size(base_blocks * splits, "project_dense_kernel");
  project_dense_kernel<T, kKind, BT><<<grid, kThreads, 0, stream>>>(X, args);
  gpu::check_launch("project_dense_kernel");
}

template <typename T, RandomKind kKind>
void launch_batch_tile(const T* X, const DenseArgs& args, cudaStream_t stream) {
  switch (batch_tile(args.B)) {
    case 4: launch<T, kKind, 4>(X, args, stream); return;
    case 8: launch<T, kKind, 8>(X, args, stream); return;
    case 16: launch<T, kKind, 16>(X, args, stream); return;
    default: launch<T, kKind, kMaxBatchTile>(X, args, stream); return;
  }
}

}  // namespace

void project_dense_cuda(const void* X, DType dtype, int64_t B, int64_t p, int64_t ldx, int64_t row_offset, int64_t k,
                        uint32_t seed, RandomKind kind, float* out, void* stream) {
  if (B == 0 || p == 0) return;
  const gpu::DeviceGuard guard(out);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  const DenseArgs args{B, p, ldx, row_offset, k, seed_key(seed),
                       static_cast<float>(1.0 / std::sqrt(static_cast<double>(k))), 0, 0, 0, out};
  gpu::dispatch_dtype(dtype, [&](auto tag) {
    using Elem = typename decltype(tag)::type;
    const auto* x = static_cast<const Elem*>(X);
    if (kind == RandomKind::rademacher) {
      launch_batch_tile<Elem, RandomKind::rademacher>(x, args, cuda_stream);
    } else {
      launch_batch_tile<Elem, RandomKind::gaussian>(x, args, cuda_stream);
    }
  });
}

}  // namespace airtrace
