// pybind11 module airtrace._C_cuda: the CUDA kernels, launched on the caller's stream.
#include "bind_ops.h"

using namespace airtrace;

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "airtrace CUDA kernels";
  m.attr("cuda_archs") = AIRTRACE_CUDA_ARCHS;
  bind::define_ops(m, &project_factored_cuda, &project_dense_cuda, &score_topk_cuda, &precondition_cuda,
                   &group_pool_scores_cuda, &digest_cuda);
}
