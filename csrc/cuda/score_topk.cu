// values[i], indices[i] = top-k over j of s[i, j] = Q[i] . X[j] (cosine if normalize), streamed.
//
// X is processed in chunks of rows sized so that the chunk's (q, chunk) fp32 score buffer holds
// at most kScoreBudget elements. Per chunk:
//  - score_chunk_kernel: a 64 x 64 SIMT GEMM tile of scores per block through shared memory
//    (for cosine the row norms are summed from the same staged tiles);
//  - select_kernel: one block per query merges the chunk's scores into the query's running
//    top-k list of 64-bit keys (order-preserving value bits, then 2^32 - 1 - j, so a larger key
//    ranks first and equal values go to the lower index). Only keys above the list's last one
//    are kept; they are bitonic-sorted in shared memory and merged with the list by rank.
// decode_kernel turns the final keys into values and indices. Work memory is
// O(q * chunk + q * topk), independent of n.
#include <algorithm>

#include "airtrace/score_topk.h"
#include "cuda_utils.cuh"

namespace airtrace {
namespace {

constexpr int kSide = 16;  // the score block is a kSide x kSide grid of threads
constexpr int kThreads = kSide * kSide;
constexpr int kTile = 64;  // queries and rows of X per score block
constexpr int kPerThread = kTile / kSide;
constexpr int kDepth = 16;              // features staged per step
constexpr int kStride = kTile + 4;      // padded shared row, still float4-aligned
constexpr int kSelectThreads = 512;
constexpr int kCandidates = 2048;       // scores examined per selection step (a power of 2)
constexpr int64_t kScoreBudget = int64_t{1} << 24;  // elements of the per-chunk score buffer
constexpr int64_t kMaxRows = 0xffffffffLL;           // rows of X per call (32-bit key index)
constexpr float kNormEps = 1e-12f;

static_assert(kPerThread == 4, "the score tile is read as float4");

// Monotone map of floats to uint32: a < b  <=>  order_bits(a) < order_bits(b).
__device__ __forceinline__ uint32_t order_bits(float v) {
  const uint32_t u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float value_of(uint32_t bits) {
  return __uint_as_float((bits & 0x80000000u) ? (bits & 0x7fffffffu) : ~bits);
}

// Ranking key of score v of row j (j < 2^32 - 1): never 0, which marks an empty slot.
__device__ __forceinline__ uint64_t score_key(float v, int64_t j) {
  if (v == 0.0f) v = 0.0f;  // -0 ranks with +0
  return (static_cast<uint64_t>(order_bits(v)) << 32) | (0xffffffffu - static_cast<uint32_t>(j));
}

// Squared norm contribution of the staged features, in double (the square of any fp32 fits): thread
// t < kTile sums Q row t, thread kTile + t sums X row t, the others return 0.
__device__ double staged_sumsq(const float (*qs)[kStride], const float (*xs)[kStride]) {
  const int t = threadIdx.x;
  if (t >= 2 * kTile) return 0.0;
  const float(*staged)[kStride] = t < kTile ? qs : xs;
  const int row = t % kTile;
  double sum = 0.0;
#pragma unroll
  for (int d = 0; d < kDepth; ++d) sum += static_cast<double>(staged[d][row]) * staged[d][row];
  return sum;
}

// S[i, jl] = Q[i] . X[j0 + jl] (times 1/(max(|Q[i]|, eps) max(|X[j]|, eps)) for cosine) on a
// kTile x kTile tile, for i < q, jl < cols; S has row stride ld.
template <typename T, bool kNormalize>
__global__ void __launch_bounds__(kThreads)
    score_chunk_kernel(const float* Q, const T* X, int64_t q, int64_t k, int64_t j0, int64_t cols, int64_t col_tiles,
                       float* S, int64_t ld) {
  __shared__ __align__(16) float qs[kDepth][kStride];  // qs[d][i] = Q[i0 + i, d0 + d]
  __shared__ __align__(16) float xs[kDepth][kStride];  // xs[d][j] = X[j0 + jl0 + j, d0 + d]
  __shared__ float inv_norm_q[kTile], inv_norm_x[kTile];

  const int64_t i0 = (blockIdx.x / col_tiles) * kTile;
  const int64_t jl0 = (blockIdx.x % col_tiles) * kTile;
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
  float acc[kPerThread][kPerThread] = {};
  double sumsq = 0.0;
  for (int64_t d0 = 0; d0 < k; d0 += kDepth) {
    for (int e = threadIdx.x; e < kTile * kDepth; e += kThreads) {
      const int row = e / kDepth, d = e % kDepth;
      const int64_t feature = d0 + d, i = i0 + row, jl = jl0 + row;
      qs[d][row] = (feature < k && i < q) ? Q[i * k + feature] : 0.0f;
      xs[d][row] = (feature < k && jl < cols) ? gpu::to_float(X[(j0 + jl) * k + feature]) : 0.0f;
    }
    __syncthreads();
    if constexpr (kNormalize) sumsq += staged_sumsq(qs, xs);
    gpu::accumulate_tile_4x4(qs, xs, ty, tx, acc);
    __syncthreads();
  }

  if constexpr (kNormalize) {
    const float inv_norm = static_cast<float>(1.0 / fmax(sqrt(sumsq), static_cast<double>(kNormEps)));
    if (threadIdx.x < kTile) {
      inv_norm_q[threadIdx.x] = inv_norm;
    } else if (threadIdx.x < 2 * kTile) {
      inv_norm_x[threadIdx.x - kTile] = inv_norm;
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < kPerThread; ++r) {
    const int64_t i = i0 + kPerThread * ty + r;
    if (i >= q) break;
#pragma unroll
    for (int c = 0; c < kPerThread; ++c) {
      const int64_t jl = jl0 + kPerThread * tx + c;
      if (jl >= cols) break;
      float s = acc[r][c];
      if constexpr (kNormalize) s = s * inv_norm_q[kPerThread * ty + r] * inv_norm_x[kPerThread * tx + c];
      S[i * ld + jl] = s;
    }
  }
}

// Number of entries of the descending array keys[0, n) greater than key.
__device__ int64_t count_greater(const uint64_t* keys, int64_t n, uint64_t key) {
  int64_t lo = 0, hi = n;  // keys[0, lo) > key >= keys[hi, n)
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (keys[mid] > key) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Sorts keys[0, n) descending (bitonic, padded with 0 keys to a power of 2 <= kCandidates).
// Called by all threads of the block; ends synchronised.
__device__ void sort_descending(uint64_t* keys, int n) {
  int size = 1;
  while (size < n) size <<= 1;
  for (int e = n + threadIdx.x; e < size; e += blockDim.x) keys[e] = 0;
  __syncthreads();
  for (int span = 2; span <= size; span <<= 1) {
    for (int stride = span / 2; stride > 0; stride >>= 1) {
      for (int e = threadIdx.x; e < size; e += blockDim.x) {
        const int partner = e ^ stride;
        if (partner > e) {
          const uint64_t a = keys[e], b = keys[partner];
          const bool descending = (e & span) == 0;
          if (descending ? a < b : a > b) {
            keys[e] = b;
            keys[partner] = a;
          }
        }
      }
      __syncthreads();
    }
  }
}

// next[0, topk) = the topk largest keys of the descending lists run[0, topk) and cand[0, n),
// descending. No key of cand equals a key of run, so the ranks are a permutation.
__device__ void merge_lists(const uint64_t* run, int64_t topk, const uint64_t* cand, int n, uint64_t* next) {
  for (int64_t e = threadIdx.x; e < topk; e += blockDim.x) {
    const int64_t rank = e + count_greater(cand, n, run[e]);
    if (rank < topk) next[rank] = run[e];
  }
  for (int e = threadIdx.x; e < n; e += blockDim.x) {
    const int64_t rank = e + count_greater(run, topk, cand[e]);
    if (rank < topk) next[rank] = cand[e];
  }
}

// run[i] <- top-k keys of run[i] and of the scores S[i, 0:cols] of rows j0 + (0:cols); spare[i]
// is the other half of a ping-pong buffer. One block per query i.
__global__ void __launch_bounds__(kSelectThreads)
    select_kernel(const float* S, int64_t ld, int64_t cols, int64_t j0, int64_t topk, uint64_t* run,
                  uint64_t* spare) {
  __shared__ uint64_t cand[kCandidates];
  __shared__ int found;

  const int64_t i = blockIdx.x;
  const float* scores = S + i * ld;
  uint64_t* const home = run + i * topk;
  uint64_t* cur = home;
  uint64_t* next = spare + i * topk;
  for (int64_t seg = 0; seg < cols; seg += kCandidates) {
    if (threadIdx.x == 0) found = 0;
    __syncthreads();
    const uint64_t threshold = cur[topk - 1];
    const int seg_len = static_cast<int>(min(static_cast<int64_t>(kCandidates), cols - seg));
    for (int e = threadIdx.x; e < seg_len; e += blockDim.x) {
      const uint64_t key = score_key(scores[seg + e], j0 + seg + e);
      if (key > threshold) cand[atomicAdd(&found, 1)] = key;
    }
    __syncthreads();
    const int n = found;
    if (n > 0) {
      sort_descending(cand, n);
      merge_lists(cur, topk, cand, n, next);
      uint64_t* const merged = next;
      next = cur;
      cur = merged;
    }
    __syncthreads();
  }
  if (cur != home) {
    for (int64_t e = threadIdx.x; e < topk; e += blockDim.x) home[e] = cur[e];
  }
}

// values[e], indices[e] from key run[e]: key 0 -> (-inf, -1), else (score, index_offset + j).
__global__ void decode_kernel(const uint64_t* run, int64_t total, int64_t index_offset, float* values,
                              int64_t* indices) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t key = run[e];
    if (key == 0) {
      values[e] = __uint_as_float(0xff800000u);  // -inf
      indices[e] = -1;
    } else {
      values[e] = value_of(static_cast<uint32_t>(key >> 32));
      indices[e] = index_offset + (0xffffffffLL - static_cast<int64_t>(key & 0xffffffffu));
    }
  }
}

// Rows of X per chunk: a multiple of kTile with q * chunk <= kScoreBudget (at least kTile), at most n rounded up.
int64_t chunk_rows(int64_t q, int64_t n) {
  const int64_t budget = std::max<int64_t>(kTile, kScoreBudget / q / kTile * kTile);
  return std::max<int64_t>(kTile, std::min(budget, gpu::ceil_div(n, kTile) * kTile));
}

template <typename T>
void launch_scores(const float* Q, const T* X, int64_t q, int64_t k, int64_t j0, int64_t cols, bool normalize,
                   float* S, int64_t ld, cudaStream_t stream) {
  const int64_t col_tiles = gpu::ceil_div(cols, kTile);
  const unsigned grid = gpu::grid_size(gpu::ceil_div(q, kTile) * col_tiles, "score_chunk_kernel");
  if (normalize) {
    score_chunk_kernel<T, true><<<grid, kThreads, 0, stream>>>(Q, X, q, k, j0, cols, col_tiles, S, ld);
  } else {
    score_chunk_kernel<T, false><<<grid, kThreads, 0, stream>>>(Q, X, q, k, j0, cols, col_tiles, S, ld);
  }
  gpu::check_launch("score_chunk_kernel");
}

}  // namespace

void score_topk_cuda(const float* Q, const void* X, DType dtype, int64_t q, int64_t n, int64_t k, int64_t topk,
                     bool normalize, int64_t index_offset, float* values, int64_t* indices, void* stream) {
  if (q == 0) return;
  if (n > kMaxRows) {
    throw std::invalid_argument("score_topk_cuda: X has more than 2^32 - 1 rows; score it in shards and merge_topk");
  }
  const gpu::DeviceGuard guard(values);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  const int64_t chunk = chunk_rows(q, n);
  const gpu::Scratch scores(sizeof(float) * q * chunk, cuda_stream);
  const gpu::Scratch lists(2 * sizeof(uint64_t) * q * topk, cuda_stream);
  uint64_t* run = lists.as<uint64_t>();
  uint64_t* spare = run + q * topk;
  gpu::check(cudaMemsetAsync(run, 0, sizeof(uint64_t) * q * topk, cuda_stream), "score_topk: cudaMemsetAsync");

  gpu::dispatch_dtype(dtype, [&](auto tag) {
    using Elem = typename decltype(tag)::type;
    const auto* x = static_cast<const Elem*>(X);
    const unsigned select_grid = gpu::grid_size(q, "select_kernel");
    for (int64_t j0 = 0; j0 < n; j0 += chunk) {
      const int64_t cols = std::min(chunk, n - j0);
      launch_scores(Q, x, q, k, j0, cols, normalize, scores.as<float>(), chunk, cuda_stream);
      select_kernel<<<select_grid, kSelectThreads, 0, cuda_stream>>>(scores.as<float>(), chunk, cols, j0, topk, run,
                                                                     spare);
      gpu::check_launch("select_kernel");
    }
  });

  const int64_t total = q * topk;
  const auto decode_grid = static_cast<unsigned>(std::min<int64_t>(gpu::ceil_div(total, 256), 4096));
  decode_kernel<<<decode_grid, 256, 0, cuda_stream>>>(run, total, index_offset, values, indices);
  gpu::check_launch("decode_kernel");
}

}  // namespace airtrace
