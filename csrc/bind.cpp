// pybind11 module airtrace._C: the CPU (C++/OpenMP) kernels and the choice of their instruction-set variant.
#include <pybind11/stl.h>

#include "airtrace/cpu_isa.h"
#include "bind_ops.h"

#ifdef AIRTRACE_OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using namespace airtrace;

PYBIND11_MODULE(_C, m) {
  m.doc() = "airtrace CPU kernels (C++/OpenMP)";
#ifdef AIRTRACE_OPENMP
  m.attr("openmp") = true;
  m.def("max_threads", []() { return omp_get_max_threads(); });
  m.def("set_num_threads", [](int n) { omp_set_num_threads(n); });
#else
  m.attr("openmp") = false;
  m.def("max_threads", []() { return 1; });
  m.def("set_num_threads", [](int) {});
#endif
  cpu_isa::select_from_env();
  m.attr("isas_built") = py::tuple(py::cast(cpu_isa::built()));
  m.attr("isas_available") = py::tuple(py::cast(cpu_isa::runnable()));
  m.attr("cpu_features") = py::tuple(py::cast(cpu_isa::cpu_features()));
  m.def("isa", &cpu_isa::current,
        "The instruction-set variant the CPU kernels run; ValueError if AIRTRACE_CPU_ISA asked for one that cannot run");
  m.def("set_isa", &cpu_isa::select, py::arg("name"),
        "Run the CPU kernels of variant `name` (one of isas_available, or 'auto' for the best); ValueError otherwise");
  bind::define_ops(
      m,
      [](const void* A, const void* G, DType dtype, const float* mask, const float* P_in, const float* P_out,
         int64_t B, int64_t T, int64_t d_in, int64_t d_out, int64_t k_in, int64_t k_out, float* out, void*) {
        project_factored_cpu(A, G, dtype, mask, P_in, P_out, B, T, d_in, d_out, k_in, k_out, out);
      },
      [](const void* X, DType dtype, int64_t B, int64_t p, int64_t ldx, int64_t row_offset, int64_t k,
         uint32_t seed, RandomKind kind, float* out, void*) {
        project_dense_cpu(X, dtype, B, p, ldx, row_offset, k, seed, kind, out);
      },
      [](const float* Q, const void* X, DType dtype, int64_t q, int64_t n, int64_t k, int64_t topk, bool normalize,
         int64_t index_offset, float* values, int64_t* indices, void*) {
        score_topk_cpu(Q, X, dtype, q, n, k, topk, normalize, index_offset, values, indices);
      },
      [](const void* G, DType dtype, const float* Q_G, const float* Q_A, const float* Lam, float damping, int64_t B,
         int64_t k_out, int64_t k_in, float* out, void*) {
        precondition_cpu(G, dtype, Q_G, Q_A, Lam, damping, B, k_out, k_in, out);
      },
      [](const float* Q, const void* X, DType dtype, int64_t q, int64_t d, const int64_t* offsets,
         const int64_t* members, int64_t G, float* out, void*) {
        group_pool_scores_cpu(Q, X, dtype, q, d, offsets, members, G, out);
      },
      [](const void* data, int64_t rows, int64_t row_bytes, uint64_t* out, void*) {
        digest_cpu(data, rows, row_bytes, out);
      });
}
