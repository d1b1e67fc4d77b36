// Shared types for the airtrace kernels: torch-free, usable from C++ and CUDA.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define AIRTRACE_HD __host__ __device__ __forceinline__
#else
#define AIRTRACE_HD inline
#endif

namespace airtrace {

// Element type of a kernel input. Accumulation is always fp32.
enum class DType : int { f32 = 0, bf16 = 1, f16 = 2 };

}  // namespace airtrace
