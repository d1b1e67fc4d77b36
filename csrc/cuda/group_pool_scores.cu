// out[x, g] = sum_{i in S_g} softmax_{i in S_g}(|s_i|) s_i with s_i = Q[x] . X[i] (0 for an empty group).
//
// One block per (group, split, tile of 64 queries), the query tile varying fastest, so the
// blocks of one group run together and find its gathered rows in L2. A block walks its share
// of the group's members 64 at a time: the 64 x 64 score tile (queries x members) is a SIMT
// GEMM through shared memory as in score_topk, with X rows gathered through the member indices.
// Each query's 4 threads then fold 16 of its scores each into their running softmax state (max
// of |s|, sum of exp, exp-weighted sum of s); at the end the 4 states are merged with warp
// shuffles. With one split (enough groups to fill the GPU) that gives the result; when there
// are few groups, each group's member tiles are dealt round-robin to `splits` blocks, which
// write their states to a small scratch buffer that merge_splits_kernel combines. Only member
// dot products are computed and nothing of size q x n is stored.
#include <algorithm>
#include <cmath>

#include "airtrace/group_pool_scores.h"
#include "cuda_utils.cuh"

namespace airtrace {
namespace {

constexpr int kSide = 16;  // the score block is a kSide x kSide grid of threads
constexpr int kThreads = kSide * kSide;
constexpr int kTile = 64;  // queries and members per score tile
constexpr int kPerThread = kTile / kSide;
constexpr int kDepth = 16;          // features staged per step
constexpr int kStride = kTile + 4;  // padded shared row, still float4-aligned
constexpr int kParts = kThreads / kTile;  // threads folding one query's scores
constexpr int kPerPart = kTile / kParts;  // scores each of them folds per tile
constexpr int64_t kMaxSplits = 1024;      // blocks sharing one group's members, at most
constexpr int kMergeThreads = 256;

static_assert(kPerThread == 4, "the score tile is read as float4");
static_assert(kParts == 4 && 32 % kParts == 0, "a query's threads are adjacent lanes of one warp");

// Softmax state over a set of scores: peak = max |s|, den = sum exp(|s| - peak),
// num = sum exp(|s| - peak) s. The empty set is (-inf, 0, 0).
struct Softmax {
  float peak, den, num;
};

__device__ __forceinline__ Softmax merge(const Softmax& a, const Softmax& b) {
  const float peak = fmaxf(a.peak, b.peak);
  if (peak == -INFINITY) return a;  // both empty
  const float wa = expf(a.peak - peak), wb = expf(b.peak - peak);
  return Softmax{peak, a.den * wa + b.den * wb, a.num * wa + b.num * wb};
}

// num / den: den >= 1 for a non-empty set (its peak adds exp(0)); the empty set gives 0 / 1.
__device__ __forceinline__ float result(const Softmax& s) { return s.num / fmaxf(s.den, 1.0f); }

// Block (g, split, tile) with blockIdx.x = (g * splits + split) * query_tiles + tile folds member
// tiles split, split + splits, ... of group g for the 64 queries i of the tile. One split: out[i, g]
// = num / den; else partial[split, i, g] = (peak, den, num).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    group_pool_kernel(const float* Q, const T* X, int64_t q, int64_t d, const int64_t* offsets,
                      const int64_t* members, int64_t G, int64_t query_tiles, int64_t splits, float* out,
                      Softmax* partial) {
  __shared__ __align__(16) float qs[kDepth][kStride];  // qs[dd][i] = Q[i0 + i, d0 + dd]
  __shared__ __align__(16) float xs[kDepth][kStride];  // xs[dd][j] = X[rows[j], d0 + dd]
  __shared__ float scores[kTile][kTile + 1];           // scores[i][j] = Q[i0 + i] . X[rows[j]]
  __shared__ int64_t rows[kTile];                      // member rows of the tile, -1 past the group

  const int64_t i0 = (blockIdx.x % query_tiles) * kTile;
  const int64_t split = (blockIdx.x / query_tiles) % splits, g = blockIdx.x / query_tiles / splits;
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
  const int query = threadIdx.x / kParts, part = threadIdx.x % kParts;
  const int64_t begin = offsets[g], end = offsets[g + 1];
  Softmax state{-INFINITY, 0.0f, 0.0f};
  for (int64_t c0 = begin + split * kTile; c0 < end; c0 += splits * kTile) {
    const int cols = end - c0 < kTile ? static_cast<int>(end - c0) : kTile;
    if (threadIdx.x < kTile) rows[threadIdx.x] = threadIdx.x < cols ? members[c0 + threadIdx.x] : -1;
    __syncthreads();
    float acc[kPerThread][kPerThread] = {};
    for (int64_t d0 = 0; d0 < d; d0 += kDepth) {
      for (int e = threadIdx.x; e < kTile * kDepth; e += kThreads) {
        const int row = e / kDepth, dd = e % kDepth;
        const int64_t feature = d0 + dd, i = i0 + row, member = rows[row];
        qs[dd][row] = (feature < d && i < q) ? Q[i * d + feature] : 0.0f;
        xs[dd][row] = (feature < d && member >= 0) ? gpu::to_float(X[member * d + feature]) : 0.0f;
      }
      __syncthreads();
      gpu::accumulate_tile_4x4(qs, xs, ty, tx, acc);
      __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < kPerThread; ++r)
#pragma unroll
      for (int c = 0; c < kPerThread; ++c) scores[kPerThread * ty + r][kPerThread * tx + c] = acc[r][c];
    __syncthreads();

    const int j0 = part * kPerPart, j1 = min(cols, j0 + kPerPart);
    if (j1 > j0) {
      float peak = state.peak;
      for (int j = j0; j < j1; ++j) peak = fmaxf(peak, fabsf(scores[query][j]));
      const float scale = expf(state.peak - peak);  // 0 while state.peak = -inf
      state.den *= scale;
      state.num *= scale;
      for (int j = j0; j < j1; ++j) {
        const float s = scores[query][j];
        const float e = expf(fabsf(s) - peak);
        state.den += e;
        state.num = fmaf(e, s, state.num);
      }
      state.peak = peak;
    }
    __syncthreads();  // rows and scores are rewritten by the next tile
  }

#pragma unroll
  for (int lane_mask = 1; lane_mask < kParts; lane_mask <<= 1) {
    const Softmax other{__shfl_xor_sync(0xffffffffu, state.peak, lane_mask),
                        __shfl_xor_sync(0xffffffffu, state.den, lane_mask),
                        __shfl_xor_sync(0xffffffffu, state.num, lane_mask)};
    state = merge(state, other);
  }
  const int64_t i = i0 + query;
  if (part != 0 || i >= q) return;
  if (splits == 1) {
    out[i * G + g] = result(state);
  } else {
    partial[(split * q + i) * G + g] = state;
  }
}

// out[e] = the result of the merged states partial[s, e] over s < splits, e < total = q * G.
__global__ void merge_splits_kernel(const Softmax* partial, int64_t splits, int64_t total, float* out) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Softmax state = partial[e];
    for (int64_t s = 1; s < splits; ++s) state = merge(state, partial[s * total + e]);
    out[e] = result(state);
  }
}

}  // namespace

void group_pool_scores_cuda(const float* Q, const void* X, DType dtype, int64_t q, int64_t d,
                            const int64_t* offsets, const int64_t* members, int64_t G, float* out, void* stream) {
  if (q == 0 || G == 0) return;
  const gpu::DeviceGuard guard(out);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  const int64_t query_tiles = gpu::ceil_div(q, kTile);
  // Split groups when there are fewer (group, query tile) blocks than 4 per multiprocessor.
  const int64_t wanted = int64_t{4} * gpu::sm_count();
  const int64_t splits = std::min(kMaxSplits, gpu::ceil_div(wanted, G * query_tiles));
  const unsigned grid = gpu::grid_size(G * splits * query_tiles, "group_pool_kernel");
  const gpu::Scratch partial(sizeof(Softmax) * (splits > 1 ? splits * q * G : 1), cuda_stream);
  gpu::dispatch_dtype(dtype, [&](auto tag) {
    using Elem = typename decltype(tag)::type;
    group_pool_kernel<Elem><<<grid, kThreads, 0, cuda_stream>>>(Q, static_cast<const Elem*>(X), q, d, offsets,
                                                                members, G, query_tiles, splits, out,
                                                                partial.as<Softmax>());
    gpu::check_launch("group_pool_kernel");
  });
  if (splits > 1) {
    const int64_t total = q * G;
    const auto merge_grid = static_cast<unsigned>(std::min<int64_t>(gpu::ceil_div(total, kMergeThreads), 4096));
    merge_splits_kernel<<<merge_grid, kMergeThreads, 0, cuda_stream>>>(partial.as<Softmax>(), splits, total, out);
    gpu::check_launch("merge_splits_kernel");
  }
}

}  // namespace airtrace
