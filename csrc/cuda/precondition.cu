// out[b] = Q_G [(Q_G^T G[b] Q_A) / (Lam + damping)] Q_A^T   (B, k_out, k_in), fp32 accumulation.
//
// One thread block per sample at a time (grid-stride over samples). The block walks the k_out rows
// in strips of KT: S = Q_G[:, strip]^T G[b] into a (min(KT, k_out), k_in) strip buffer, then
// R[strip] = (S Q_A) / (Lam[strip] + damping) into the (k_out, k_in) rotated intermediate R; then,
// strip by strip again, S = Q_G[strip] R and out[b][strip] = S Q_A^T. Every product is a SIMT GEMM
// in KT x KT output tiles whose operands are staged through shared memory kDepth terms at a time.
// R and S live in dynamic shared memory; only when their (k_out + min(KT, k_out)) k_in floats exceed
// the device's per-block limit (huge k) do they live in a per-block global scratch instead.
#include <algorithm>
#include <optional>

#include "airtrace/precondition.h"
#include "cuda_utils.cuh"

namespace airtrace {
namespace {

constexpr int kSide = 16;  // the block is a kSide x kSide grid of threads
constexpr int kThreads = kSide * kSide;
constexpr int kDepth = 16;                // terms of a product staged per step
constexpr size_t kSpillBytes = 256 << 20;  // cap on the global scratch of the spill path

// A strided matrix read as M(mn, k) = ptr[mn * stride_mn + k * stride_k], zero outside
// [0, mn_len) x [0, k_len): the rows of a GEMM's left operand (mn = i) or the columns of its
// right operand (mn = j), k running along the sum.
template <typename T>
struct View {
  const T* ptr;
  int64_t stride_mn, stride_k, mn_len, k_len;

  __device__ float at(int64_t mn, int64_t k) const {
    return (mn < mn_len && k < k_len) ? gpu::to_float(ptr[mn * stride_mn + k * stride_k]) : 0.0f;
  }
};

// tile[d][c] = v.at(mn0 + c, k0 + d) for d < kDepth, c < KT, consecutive threads walking the
// index along which v is contiguous (coalesced global loads, few bank conflicts in R and S).
// Tile rows are padded to KT + 1 so that walking d does not hit one bank.
template <int KT, typename T>
__device__ void stage(const View<T>& v, int64_t mn0, int64_t k0, float (*tile)[KT + 1]) {
  for (int e = threadIdx.x; e < kDepth * KT; e += kThreads) {
    const bool along_k = v.stride_k == 1;
    const int d = along_k ? e % kDepth : e / KT;
    const int c = along_k ? e / kDepth : e % KT;
    tile[d][c] = v.at(mn0 + c, k0 + d);
  }
}

// C = A B with A(i, k) = a.at(i, k) (i < a.mn_len <= KT) and B(k, j) = b.at(j, k) (j < b.mn_len),
// summing k < a.k_len: each C(i, j) goes to store(i, j, value), KT columns at a time. Ends with a
// barrier, so the next product may read what `store` wrote.
template <int KT, typename TA, typename TB, typename Store>
__device__ void block_gemm(const View<TA>& a, const View<TB>& b, float (*as)[KT + 1], float (*bs)[KT + 1],
                           Store store) {
  constexpr int kPerThread = KT / kSide;
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
  for (int64_t n0 = 0; n0 < b.mn_len; n0 += KT) {
    float acc[kPerThread][kPerThread] = {};
    for (int64_t k0 = 0; k0 < a.k_len; k0 += kDepth) {
      stage<KT>(a, 0, k0, as);
      stage<KT>(b, n0, k0, bs);
      __syncthreads();
#pragma unroll
      for (int d = 0; d < kDepth; ++d) {
        float x[kPerThread], y[kPerThread];
#pragma unroll
        for (int r = 0; r < kPerThread; ++r) x[r] = as[d][ty + kSide * r];
#pragma unroll
        for (int c = 0; c < kPerThread; ++c) y[c] = bs[d][tx + kSide * c];
#pragma unroll
        for (int r = 0; r < kPerThread; ++r)
#pragma unroll
          for (int c = 0; c < kPerThread; ++c) acc[r][c] = fmaf(x[r], y[c], acc[r][c]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < kPerThread; ++r) {
      const int64_t i = ty + kSide * r;
#pragma unroll
      for (int c = 0; c < kPerThread; ++c) {
        const int64_t j = n0 + tx + kSide * c;
        if (i < a.mn_len && j < b.mn_len) store(i, j, acc[r][c]);
      }
    }
  }
  __syncthreads();
}

// Floats of R (k_out, k_in) and the strip buffer S (min(KT, k_out), k_in) that one block works in.
template <int KT>
__host__ __device__ int64_t work_floats(int64_t k_out, int64_t k_in) {
  return (k_out + (k_out < KT ? k_out : KT)) * k_in;
}

struct PreconditionArgs {
  const float* Q_G;  // (k_out, k_out)
  const float* Q_A;  // (k_in, k_in)
  const float* Lam;  // (k_out, k_in)
  float damping;
  int64_t B, k_out, k_in;
  float* out;    // (B, k_out, k_in)
  float* spill;  // grid x work_floats<KT> of global scratch, or null: dynamic shared memory
};

// out[b] = Q_G [(Q_G^T G[b] Q_A) / (Lam + damping)] Q_A^T for b = blockIdx.x, blockIdx.x + gridDim.x, ...
template <typename T, int KT>
__global__ void __launch_bounds__(kThreads) precondition_kernel(const T* G, PreconditionArgs args) {
  __shared__ float as[kDepth][KT + 1];
  __shared__ float bs[kDepth][KT + 1];
  extern __shared__ float shared_work[];

  const int64_t k_out = args.k_out, k_in = args.k_in, size = k_out * k_in;
  float* R = args.spill != nullptr ? args.spill + static_cast<int64_t>(blockIdx.x) * work_floats<KT>(k_out, k_in)
                                   : shared_work;
  float* S = R + size;  // (min(KT, k_out), k_in) strip
  const float* Q_G = args.Q_G;
  const float* Q_A = args.Q_A;
  const float* Lam = args.Lam;
  const float damping = args.damping;
  for (int64_t b = blockIdx.x; b < args.B; b += gridDim.x) {
    const T* G_b = G + b * size;
    float* out_b = args.out + b * size;
    for (int64_t i0 = 0; i0 < k_out; i0 += KT) {
      const int64_t rows = k_out - i0 < KT ? k_out - i0 : KT;
      // S(i, j) = sum_p Q_G[p, i0 + i] G_b[p, j]
      block_gemm<KT>(View<float>{Q_G + i0, 1, k_out, rows, k_out}, View<T>{G_b, 1, k_in, k_in, k_out}, as, bs,
                     [&](int64_t i, int64_t j, float v) { S[i * k_in + j] = v; });
      // R[i0 + i, j] = sum_q S(i, q) Q_A[q, j] / (Lam[i0 + i, j] + damping)
      block_gemm<KT>(View<float>{S, k_in, 1, rows, k_in}, View<float>{Q_A, 1, k_in, k_in, k_in}, as, bs,
                     [&](int64_t i, int64_t j, float v) {
                       const int64_t e = (i0 + i) * k_in + j;
                       R[e] = v / (Lam[e] + damping);
                     });
    }
    for (int64_t i0 = 0; i0 < k_out; i0 += KT) {
      const int64_t rows = k_out - i0 < KT ? k_out - i0 : KT;
      // S(i, j) = sum_p Q_G[i0 + i, p] R[p, j]
      block_gemm<KT>(View<float>{Q_G + i0 * k_out, k_out, 1, rows, k_out}, View<float>{R, 1, k_in, k_in, k_out}, as,
                     bs, [&](int64_t i, int64_t j, float v) { S[i * k_in + j] = v; });
      // out_b[i0 + i, j] = sum_q S(i, q) Q_A[j, q]
      block_gemm<KT>(View<float>{S, k_in, 1, rows, k_in}, View<float>{Q_A, k_in, 1, k_in, k_in}, as, bs,
                     [&](int64_t i, int64_t j, float v) { out_b[(i0 + i) * k_in + j] = v; });
    }
  }
}

// Tile side: the smallest of 16, 32, 64 covering max(k_in, k_out), else 64 (several tiles).
int tile_side(int64_t k_in, int64_t k_out) {
  const int64_t k = std::max(k_in, k_out);
  return k <= 16 ? 16 : (k <= 32 ? 32 : 64);
}

template <typename T, int KT>
void launch(const T* G, PreconditionArgs args, cudaStream_t stream) {
  void (*const kernel)(const T*, PreconditionArgs) = precondition_kernel<T, KT>;
  int device = 0, optin = 0;
  gpu::check(cudaGetDevice(&device), "cudaGetDevice");
  gpu::check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute");
  cudaFuncAttributes attributes{};
  gpu::check(cudaFuncGetAttributes(&attributes, kernel), "precondition: cudaFuncGetAttributes");
  const size_t work_bytes = sizeof(float) * static_cast<size_t>(work_floats<KT>(args.k_out, args.k_in));
  const size_t shared_limit = static_cast<size_t>(optin) - attributes.sharedSizeBytes;
  size_t shared = 0;
  int64_t grid = 0;
  std::optional<gpu::Scratch> spill;
  if (work_bytes <= shared_limit) {
    shared = work_bytes;
    if (shared > static_cast<size_t>(attributes.maxDynamicSharedSizeBytes)) {
      gpu::check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)),
                 "precondition: cudaFuncSetAttribute");
    }
    int per_sm = 0;
    gpu::check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, shared),
               "precondition: cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    grid = std::min<int64_t>(args.B, static_cast<int64_t>(std::max(per_sm, 1)) * gpu::sm_count());
  } else {
    const int64_t affordable = std::max<int64_t>(1, static_cast<int64_t>(kSpillBytes / work_bytes));
    grid = std::min({args.B, 2 * static_cast<int64_t>(gpu::sm_count()), affordable});
    spill.emplace(work_bytes * static_cast<size_t>(grid), stream);
    args.spill = spill->as<float>();
  }
  precondition_kernel<T, KT><<<gpu::grid_size(grid, "precondition_kernel"), kThreads, shared, stream>>>(G, args);
  gpu::check_launch("precondition_kernel");
}

}  // namespace

void precondition_cuda(const void* G, DType dtype, const float* Q_G, const float* Q_A, const float* Lam,
                       float damping, int64_t B, int64_t k_out, int64_t k_in, float* out, void* stream) {
  if (B == 0) return;
  const gpu::DeviceGuard guard(out);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  const PreconditionArgs args{Q_G, Q_A, Lam, damping, B, k_out, k_in, out, nullptr};
  const int side = tile_side(k_in, k_out);
  gpu::dispatch_dtype(dtype, [&](auto tag) {
    using Elem = typename decltype(tag)::type;
    const auto* g = static_cast<const Elem*>(G);
    if (side == 16) {
      launch<Elem, 16>(g, args, cuda_stream);
    } else if (side == 32) {
      launch<Elem, 32>(g, args, cuda_stream);
    } else {
      launch<Elem, 64>(g, args, cuda_stream);
    }
  });
}

}  // namespace airtrace
