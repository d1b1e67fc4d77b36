// K-FAC / EK-FAC preconditioning in a Kronecker eigenbasis, fused per sample.
//   out[b] = Q_G [(Q_G^T G[b] Q_A) / (Lam + damping)] Q_A^T                     -> (B, k_out, k_in)
// G (B,k_out,k_in) row-major in `dtype`; Q_G (k_out,k_out), Q_A (k_in,k_in) and Lam (k_out,k_in)
// row-major fp32; out fp32, overwritten. fp32 accumulation; Lam + damping is formed in fp32 and
// callers guarantee it is > 0. The rotated intermediate never goes to global memory.
#pragma once
#include "airtrace/common.h"

namespace airtrace {

void precondition_cpu(const void* G, DType dtype, const float* Q_G, const float* Q_A, const float* Lam,
                      float damping, int64_t B, int64_t k_out, int64_t k_in, float* out);

// Same contract on device pointers, enqueued on `stream` (a cudaStream_t).
void precondition_cuda(const void* G, DType dtype, const float* Q_G, const float* Q_A, const float* Lam,
                       float damping, int64_t B, int64_t k_out, int64_t k_in, float* out, void* stream);

}  // namespace airtrace
