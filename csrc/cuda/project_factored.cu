// out[b] = sum_t m[b,t] (G[b,t] P_out)^T (A[b,t] P_in)   (B, k_out, k_in), fp32 accumulation.
//
// One thread block per (sample b, kTile x kTile tile of out[b], slice of T). For every chunk of
// kTokens tokens the block projects the A and G chunks onto the tile's columns of P_in / P_out
// (a SIMT GEMM staged through shared memory, kDepth features at a time), keeps both projections
// in shared memory and adds their outer-product sum over the chunk's tokens to per-thread
// registers. When T is split over several blocks, `out` is zeroed and the partials atomically added.
#include <algorithm>

#include "airtrace/project_factored.h"
#include "cuda_utils.cuh"

namespace airtrace {
namespace {

constexpr int kSide = 16;                 // the block is a kSide x kSide grid of threads
constexpr int kThreads = kSide * kSide;
constexpr int kTokens = 64;               // tokens per chunk
constexpr int kDepth = 16;                // features of A / G staged per step
constexpr int kRowsPerThread = kTokens / kSide;

struct FactoredArgs {
  const float* mask;  // (B, T) or null
  const float* P_in;  // (d_in, k_in)
  const float* P_out; // (d_out, k_out)
  int64_t T, d_in, d_out, k_in, k_out;
  int64_t tiles_in;          // tiles along k_in
  int64_t tiles;             // tiles per sample
  int64_t chunks;            // token chunks per sample
  int64_t chunks_per_split;  // token chunks per block
  int64_t splits;            // blocks per (sample, tile)
  float* out;
};

// proj[t][c] = m[t0 + t] * sum_d X[t0 + t, d] P[d, c0 + c]  for t < kTokens, c < KT; rows past
// T and columns past `cols` are zero. X is one sample (T, depth), P is (depth, cols); m = 1 when
// `mask` is null. Ends with proj written by this thread; the caller synchronises before reading.
template <int KT, typename T>
__device__ void project_chunk(const T* X, int64_t tokens, int64_t t0, int64_t depth, const float* P, int64_t cols,
                              int64_t c0, const float* mask, float (*xs)[kDepth], float (*ps)[KT],
                              float (*proj)[KT]) {
  constexpr int kColsPerThread = KT / kSide;
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
  float acc[kRowsPerThread][kColsPerThread] = {};
  for (int64_t d0 = 0; d0 < depth; d0 += kDepth) {
    for (int e = threadIdx.x; e < kTokens * kDepth; e += kThreads) {
      const int t = e / kDepth, d = e % kDepth;
      const int64_t token = t0 + t, feature = d0 + d;
      xs[t][d] = (token < tokens && feature < depth) ? gpu::to_float(X[token * depth + feature]) : 0.0f;
    }
    for (int e = threadIdx.x; e < kDepth * KT; e += kThreads) {
      const int d = e / KT, c = e % KT;
      const int64_t feature = d0 + d, col = c0 + c;
      ps[d][c] = (feature < depth && col < cols) ? P[feature * cols + col] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      float x[kRowsPerThread], p[kColsPerThread];
#pragma unroll
      for (int r = 0; r < kRowsPerThread; ++r) x[r] = xs[ty + kSide * r][d];
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) p[c] = ps[d][tx + kSide * c];
#pragma unroll
      for (int r = 0; r < kRowsPerThread; ++r)
#pragma unroll
        for (int c = 0; c < kColsPerThread; ++c) acc[r][c] += x[r] * p[c];
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int64_t token = t0 + ty + kSide * r;
    const float m = (mask != nullptr && token < tokens) ? mask[token] : 1.0f;
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c) proj[ty + kSide * r][tx + kSide * c] = m * acc[r][c];
  }
}

// acc[r][c] += sum_t gp[t][ty + kSide r] * ap[t][tx + kSide c]   (this thread's part of gp^T ap).
template <int KT>
__device__ void accumulate_outer(const float (*gp)[KT], const float (*ap)[KT],
                                 float (&acc)[KT / kSide][KT / kSide]) {
  constexpr int kPerThread = KT / kSide;
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
#pragma unroll 4
  for (int t = 0; t < kTokens; ++t) {
    float g[kPerThread], a[kPerThread];
#pragma unroll
    for (int r = 0; r < kPerThread; ++r) g[r] = gp[t][ty + kSide * r];
#pragma unroll
    for (int c = 0; c < kPerThread; ++c) a[c] = ap[t][tx + kSide * c];
#pragma unroll
    for (int r = 0; r < kPerThread; ++r)
#pragma unroll
      for (int c = 0; c < kPerThread; ++c) acc[r][c] += g[r] * a[c];
  }
}

// out[b, o0:o0+KT, i0:i0+KT] (+)= sum over this block's tokens t of m[b,t] (G[b,t] P_out)^T (A[b,t] P_in).
template <typename T, int KT>
__global__ void __launch_bounds__(kThreads) project_factored_kernel(const T* A, const T* G, FactoredArgs args) {
  __shared__ float xs[kTokens][kDepth];
  __shared__ float ps[kDepth][KT];
  __shared__ float ap[kTokens][KT];
  __shared__ float gp[kTokens][KT];

  const int64_t block = blockIdx.x;
  const int64_t split = block % args.splits;
  const int64_t tile = (block / args.splits) % args.tiles;
  const int64_t b = block / args.splits / args.tiles;
  const int64_t i0 = (tile % args.tiles_in) * KT, o0 = (tile / args.tiles_in) * KT;
  const T* A_b = A + b * args.T * args.d_in;
  const T* G_b = G + b * args.T * args.d_out;
  const float* mask_b = args.mask != nullptr ? args.mask + b * args.T : nullptr;

  constexpr int kPerThread = KT / kSide;
  float acc[kPerThread][kPerThread] = {};
  const int64_t chunk_end = min(args.chunks, (split + 1) * args.chunks_per_split);
  for (int64_t chunk = split * args.chunks_per_split; chunk < chunk_end; ++chunk) {
    const int64_t t0 = chunk * kTokens;
    project_chunk<KT>(A_b, args.T, t0, args.d_in, args.P_in, args.k_in, i0, nullptr, xs, ps, ap);
    project_chunk<KT>(G_b, args.T, t0, args.d_out, args.P_out, args.k_out, o0, mask_b, xs, ps, gp);
    __syncthreads();
    accumulate_outer<KT>(gp, ap, acc);
    __syncthreads();
  }

  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
#pragma unroll
  for (int r = 0; r < kPerThread; ++r) {
    const int64_t o = o0 + ty + kSide * r;
#pragma unroll
    for (int c = 0; c < kPerThread; ++c) {
      const int64_t i = i0 + tx + kSide * c;
      if (o < args.k_out && i < args.k_in) {
        float* dst = args.out + (b * args.k_out + o) * args.k_in + i;
        if (args.splits > 1) {
          atomicAdd(dst, acc[r][c]);
        } else {
          *dst = acc[r][c];
        }
      }
    }
  }
}

// Tile side: the smallest of 16, 32, 64 covering max(k_in, k_out), else 64 (several tiles).
int tile_side(int64_t k_in, int64_t k_out) {
  const int64_t k = std::max(k_in, k_out);
  return k <= 16 ? 16 : (k <= 32 ? 32 : 64);
}

template <typename T, int KT>
void launch(const T* A, const T* G, FactoredArgs args, int64_t B, cudaStream_t stream) {
  args.tiles_in = gpu::ceil_div(args.k_in, KT);
  args.tiles = args.tiles_in * gpu::ceil_div(args.k_out, KT);
  args.chunks = gpu::ceil_div(args.T, kTokens);
  // Split T until the grid has about 4 blocks per SM, never below one chunk per block.
  const int64_t base_blocks = B * args.tiles;
  const int64_t wanted = std::clamp<int64_t>(gpu::ceil_div(4 * gpu::sm_count(), base_blocks), 1, args.chunks);
  args.chunks_per_split = gpu::ceil_div(args.chunks, wanted);
  args.splits = gpu::ceil_div(args.chunks, args.chunks_per_split);
  if (args.splits > 1) {
    gpu::check(cudaMemsetAsync(args.out, 0, sizeof(float) * B * args.k_out * args.k_in, stream),
               "project_factored: cudaMemsetAsync");
  }
  const unsigned grid = gpu::grid_size(base_blocks * args.splits, "project_factored_kernel");
  project_factored_kernel<T, KT><<<grid, kThreads, 0, stream>>>(A, G, args);
  gpu::check_launch("project_factored_kernel");
}

}  // namespace

void project_factored_cuda(const void* A, const void* G, DType dtype, const float* mask, const float* P_in,
                           const float* P_out, int64_t B, int64_t T, int64_t d_in, int64_t d_out, int64_t k_in,
                           int64_t k_out, float* out, void* stream) {
  if (B == 0) return;
  const gpu::DeviceGuard guard(out);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  if (T == 0) {
    gpu::check(cudaMemsetAsync(out, 0, sizeof(float) * B * k_out * k_in, cuda_stream),
               "project_factored: cudaMemsetAsync");
    return;
  }
  const FactoredArgs args{mask, P_in, P_out, T, d_in, d_out, k_in, k_out, 0, 0, 0, 0, 0, out};
  const int side = tile_side(k_in, k_out);
  gpu::dispatch_dtype(dtype, [&](auto tag) {
    using Elem = typename decltype(tag)::type;
    const auto* a = static_cast<const Elem*>(A);
    const auto* g = static_cast<const Elem*>(G);
    if (side == 16) {
      launch<Elem, 16>(a, g, args, B, cuda_stream);
    } else if (side == 32) {
      launch<Elem, 32>(a, g, args, B, cuda_stream);
    } else {
      launch<Elem, 64>(a, g, args, B, cuda_stream);
    }
  });
}

}  // namespace airtrace
