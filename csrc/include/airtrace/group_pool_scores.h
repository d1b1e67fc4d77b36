// Attention pooling of training groups (AirRep group scores).
//   s_i = Q[x] . X[i],  out[x, g] = sum_{i in S_g} softmax_{i in S_g}(|s_i|) s_i,  0 for an empty S_g
// Q (q,d) fp32, X (n,d) in `dtype`, both row-major. Groups in CSR form: S_g is the multiset
// members[offsets[g] .. offsets[g+1]) (G + 1 offsets, non-decreasing, offsets[0] = 0; members
// int64 rows of X). Groups may overlap and repeat rows. out (q, G) fp32 row-major.
// Only the dot products of members are computed, group by group, and pooled with an online
// (max-subtracted) softmax: the (q, n) score matrix is never formed.
#pragma once
#include "airtrace/common.h"

namespace airtrace {

void group_pool_scores_cpu(const float* Q, const void* X, DType dtype, int64_t q, int64_t d, const int64_t* offsets,
                           const int64_t* members, int64_t G, float* out);

// Same contract on device pointers, enqueued on `stream` (a cudaStream_t).
void group_pool_scores_cuda(const float* Q, const void* X, DType dtype, int64_t q, int64_t d,
                            const int64_t* offsets, const int64_t* members, int64_t G, float* out, void* stream);

}  // namespace airtrace
