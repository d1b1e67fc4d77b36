// Shared helpers for the airtrace CUDA kernels: error checks, element loads, dtype dispatch,
// device selection and stream-ordered scratch memory.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "airtrace/common.h"

namespace airtrace::gpu {

// Throws std::runtime_error naming `what` when `status` is an error.
inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("airtrace CUDA: ") + what + " failed: " + cudaGetErrorString(status));
  }
}

// Checks the launch of the kernel named `kernel` (configuration errors surface here).
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Number of thread blocks for a flattened 1-D grid; throws when it exceeds gridDim.x's limit.
inline unsigned grid_size(int64_t blocks, const char* kernel) {
  if (blocks > 0x7fffffff) {
    throw std::runtime_error(std::string("airtrace CUDA: ") + kernel + ": problem too large for one launch");
  }
  return static_cast<unsigned>(blocks);
}

// Streaming multiprocessors of the current device.
inline int sm_count() {
  int device = 0, count = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return count;
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with T the device storage type of `dtype` (float, __nv_bfloat16, __half).
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32: f(TypeTag<float>{}); return;
    case DType::bf16: f(TypeTag<__nv_bfloat16>{}); return;
    case DType::f16: f(TypeTag<__half>{}); return;
  }
  throw std::invalid_argument("airtrace CUDA: unknown dtype code");
}

// Makes the device that owns `device_ptr` current for the guard's lifetime, so kernels launch
// on the device of the caller's tensors and stream.
class DeviceGuard {
 public:
  explicit DeviceGuard(const void* device_ptr) {
    cudaPointerAttributes attributes{};
    check(cudaPointerGetAttributes(&attributes, device_ptr), "cudaPointerGetAttributes");
    if (attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged) {
      throw std::invalid_argument("airtrace CUDA: output pointer is not device memory");
    }
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (attributes.device != previous_) check(cudaSetDevice(attributes.device), "cudaSetDevice");
    restore_ = attributes.device != previous_;
  }
  ~DeviceGuard() {
    if (restore_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool restore_ = false;
};

// Stream-ordered scratch allocation, released on the same stream when the owner goes out of scope.
// acc[r][c] += Σ_dd qs[dd][4ty + r] · xs[dd][4tx + c]: one staged depth slice of a score tile in
// which each thread owns a 4 x 4 block (rows 4ty.., columns 4tx..); rows of qs, xs float4-aligned.
template <int kDepth, int kStride>
__device__ __forceinline__ void accumulate_tile_4x4(const float (&qs)[kDepth][kStride],
                                                    const float (&xs)[kDepth][kStride], int ty, int tx,
                                                    float (&acc)[4][4]) {
#pragma unroll
  for (int dd = 0; dd < kDepth; ++dd) {
    const float4 a4 = *reinterpret_cast<const float4*>(&qs[dd][4 * ty]);
    const float4 x4 = *reinterpret_cast<const float4*>(&xs[dd][4 * tx]);
    const float a[4] = {a4.x, a4.y, a4.z, a4.w};
    const float x[4] = {x4.x, x4.y, x4.z, x4.w};
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][c] += a[r] * x[c];
  }
}

class Scratch {
 public:
  Scratch(size_t bytes, cudaStream_t stream) : stream_(stream) {
    check(cudaMallocAsync(&ptr_, bytes, stream), "cudaMallocAsync");
  }
  ~Scratch() { cudaFreeAsync(ptr_, stream_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

}  // namespace airtrace::gpu
