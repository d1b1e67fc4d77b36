// Sparse Johnson-Lindenstrauss projection with an implicit matrix (see hash.h, "sparse").
//   out[b, col_j(row_offset + i)] += sign_j(row_offset + i) / sqrt(s) * X[b, i]   for i < p, j < s   -> (B, k)
// Each input coordinate lands in s output columns, one per block of k / s columns, with a hashed
// sign: O(B p s) work, no matrix stored. X (B,p) in `dtype` with row stride ldx (elements); out (B,k)
// fp32, accumulated into (callers zero it), so per-layer blocks at increasing row_offset sum up.
// 64-bit row indices; 1 <= s <= 4 and s <= k.
#pragma once
#include "airtrace/hash.h"

namespace airtrace {

void project_sparse_cpu(const void* X, DType dtype, int64_t B, int64_t p, int64_t ldx, int64_t row_offset,
                        int64_t k, int64_t s, uint32_t seed, float* out);

// Same contract on device pointers, enqueued on `stream` (a cudaStream_t).
void project_sparse_cuda(const void* X, DType dtype, int64_t B, int64_t p, int64_t ldx, int64_t row_offset,
                         int64_t k, int64_t s, uint32_t seed, float* out, void* stream);

}  // namespace airtrace
