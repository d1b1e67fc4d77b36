// out[r] = the 128-bit digest of row r's bytes (digest.h): sums over 8 KiB blocks of stripe products and raw stripes.
//
// One warp per (row, block): lane l takes the stripes t = l, l + 32, ... of the block, all of class l mod 4,
// and the warp adds the lanes of each class with shuffles; lane 0 folds the block into (x_b, y_b) and adds
// them to the row's sums with 64-bit atomics (sums mod 2^64 commute: the bits do not depend on the order).
// finish_kernel then applies the length. Stripes are read with 8-byte loads when the row is 8-byte
// aligned, byte by byte otherwise.
#include <algorithm>

#include "airtrace/digest.h"
#include "cuda_utils.cuh"

namespace airtrace {
namespace {

constexpr int kWarps = 8;  // warps (blocks of the row) per thread block
constexpr unsigned kFull = 0xffffffffu;

// Bytes [0, n) of p as a zero-padded little-endian stripe.
__device__ __forceinline__ uint64_t load_stripe(const unsigned char* p, int64_t n, bool aligned) {
  if (aligned && n >= 8) return *reinterpret_cast<const uint64_t*>(p);
  uint64_t v = 0;
  for (int i = 0; i < 8 && i < n; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

__global__ void __launch_bounds__(kWarps * 32)
    digest_blocks_kernel(const unsigned char* data, int64_t rows, int64_t row_bytes, int64_t blocks,
                         unsigned long long* sums) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (item >= rows * blocks) return;
  const int lane = threadIdx.x % 32;
  const int64_t r = item / blocks, b = item % blocks;
  const int64_t offset = b * 8 * kDigestStripes;
  const int64_t bytes = row_bytes - offset < 8 * kDigestStripes ? row_bytes - offset : 8 * kDigestStripes;
  const unsigned char* p = data + r * row_bytes + offset;
  const bool aligned = (reinterpret_cast<uintptr_t>(p) & 7) == 0;
  uint64_t prod = 0, raw = 0;
  for (int64_t t = lane; t * 8 < bytes; t += 32) {
    const uint64_t v = load_stripe(p + 8 * t, bytes - 8 * t, aligned);
    const auto lo = static_cast<uint32_t>(v), hi = static_cast<uint32_t>(v >> 32);
    prod += digest_product(lo, hi, static_cast<uint32_t>(t));
    raw += v;
  }
  // Lanes l, l + 4, ..., l + 28 hold class l mod 4: add them into lanes 0..3.
  for (int step = 16; step >= 4; step /= 2) {
    prod += __shfl_down_sync(kFull, prod, step);
    raw += __shfl_down_sync(kFull, raw, step);
  }
  uint64_t P[4], R[4];
  for (int c = 0; c < 4; ++c) {
    P[c] = __shfl_sync(kFull, prod, c);
    R[c] = __shfl_sync(kFull, raw, c);
  }
  if (lane == 0) {
    uint64_t x, y;
    digest_block(static_cast<uint64_t>(b), P, R, &x, &y);
    atomicAdd(sums + 2 * r, static_cast<unsigned long long>(x));
    atomicAdd(sums + 2 * r + 1, static_cast<unsigned long long>(y));
  }
}

__global__ void finish_kernel(const unsigned long long* sums, int64_t rows, int64_t row_bytes, uint64_t* out) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    digest_finish(sums[2 * r], sums[2 * r + 1], static_cast<uint64_t>(row_bytes), out + 2 * r);
  }
}

}  // namespace

void digest_cuda(const void* data, int64_t rows, int64_t row_bytes, uint64_t* out, void* stream) {
  if (rows == 0) return;
  const gpu::DeviceGuard guard(out);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  const int64_t blocks = gpu::ceil_div(row_bytes, 8 * kDigestStripes);
  const gpu::Scratch sums(sizeof(unsigned long long) * 2 * rows, cuda_stream);
  gpu::check(cudaMemsetAsync(sums.as<void>(), 0, sizeof(unsigned long long) * 2 * rows, cuda_stream),
             "digest: cudaMemsetAsync");
  if (blocks > 0) {
    const unsigned grid = gpu::grid_size(gpu::ceil_div(rows * blocks, kWarps), "digest_blocks_kernel");
    digest_blocks_kernel<<<grid, kWarps * 32, 0, cuda_stream>>>(static_cast<const unsigned char*>(data), rows,
                                                                row_bytes, blocks, sums.as<unsigned long long>());
    gpu::check_launch("digest_blocks_kernel");
  }
  const auto finish_grid = static_cast<unsigned>(std::min<int64_t>(gpu::ceil_div(rows, 256), 4096));
  finish_kernel<<<finish_grid, 256, 0, cuda_stream>>>(sums.as<unsigned long long>(), rows, row_bytes, out);
  gpu::check_launch("finish_kernel");
}

}  // namespace airtrace
