// Streamed inner-product scoring with a running top-k.
//   s[i, j] = Q[i] . X[j]   (normalize: / (max(|Q[i]|, 1e-12) * max(|X[j]|, 1e-12)))
//   values[i] = the topk largest s[i, :] in descending order, indices[i] = j + index_offset
// Q (q,k) fp32, X (n,k) in `dtype`, both row-major. Slots past n hold -inf and index -1.
// Equal values are ordered by lower index first. Work memory is O(q*topk + tile):
// the (q, n) score matrix is never formed.
#pragma once
#include "airtrace/common.h"

namespace airtrace {

void score_topk_cpu(const float* Q, const void* X, DType dtype, int64_t q, int64_t n, int64_t k,
                    int64_t topk, bool normalize, int64_t index_offset, float* values,
                    int64_t* indices);

// Same contract on device pointers, enqueued on `stream` (a cudaStream_t).
void score_topk_cuda(const float* Q, const void* X, DType dtype, int64_t q, int64_t n, int64_t k,
                     int64_t topk, bool normalize, int64_t index_offset, float* values,
                     int64_t* indices, void* stream);

}  // namespace airtrace
