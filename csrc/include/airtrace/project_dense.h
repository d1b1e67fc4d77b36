// Dense (TRAK-style) random projection with an implicit matrix (see hash.h).
//   out[b, c] += sum_{i<p} X[b, i] * R[row_offset + i, c]                 -> (B, k)
// X (B,p) in `dtype` with row stride ldx (elements); out (B,k) fp32, accumulated
// into (callers zero it), so per-layer blocks at increasing row_offset sum up.
// R is never stored; 64-bit row indices, so p and row_offset may exceed 2^31.
#pragma once
#include "airtrace/hash.h"

namespace airtrace {

void project_dense_cpu(const void* X, DType dtype, int64_t B, int64_t p, int64_t ldx,
                       int64_t row_offset, int64_t k, uint32_t seed, RandomKind kind, float* out);

// Same contract on device pointers, enqueued on `stream` (a cudaStream_t).
void project_dense_cuda(const void* X, DType dtype, int64_t B, int64_t p, int64_t ldx,
                        int64_t row_offset, int64_t k, uint32_t seed, RandomKind kind, float* out,
                        void* stream);

}  // namespace airtrace
