// Factored (LoGra) per-sample gradient projection of a linear layer.
//   out[b] = sum_t m[b,t] * (G[b,t] @ P_out)^T (A[b,t] @ P_in)      -> (B, k_out, k_in)
// A (B,T,d_in), G (B,T,d_out) row-major in `dtype`; P_in (d_in,k_in), P_out (d_out,k_out),
// mask (B,T) fp32 or null (all ones); out fp32, overwritten. fp32 accumulation.
#pragma once
#include "airtrace/common.h"

namespace airtrace {

void project_factored_cpu(const void* A, const void* G, DType dtype, const float* mask,
                          const float* P_in, const float* P_out, int64_t B, int64_t T,
                          int64_t d_in, int64_t d_out, int64_t k_in, int64_t k_out, float* out);

// Same contract on device pointers, enqueued on `stream` (a cudaStream_t).
void project_factored_cuda(const void* A, const void* G, DType dtype, const float* mask,
                           const float* P_in, const float* P_out, int64_t B, int64_t T,
                           int64_t d_in, int64_t d_out, int64_t k_in, int64_t k_out, float* out,
                           void* stream);

}  // namespace airtrace
