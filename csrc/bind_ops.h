// Shared pybind11 definitions of the kernel entry points for _C and _C_cuda.
// Arguments are raw pointers (tensor.data_ptr()) and sizes; airtrace/ops.py has
// validated shapes, dtypes and devices, so only cheap sanity checks live here.
#pragma once
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>

#include "airtrace/digest.h"
#include "airtrace/group_pool_scores.h"
#include "airtrace/precondition.h"
#include "airtrace/project_dense.h"
#include "airtrace/project_factored.h"
#include "airtrace/score_topk.h"

namespace airtrace::bind {

namespace py = pybind11;

template <typename T>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

inline DType to_dtype(int code) {
  if (code < 0 || code > 2) throw std::invalid_argument("dtype code must be 0 (f32), 1 (bf16) or 2 (f16)");
  return static_cast<DType>(code);
}

inline RandomKind to_kind(int code) {
  if (code < 0 || code > 1) throw std::invalid_argument("kind code must be 0 (rademacher) or 1 (gaussian)");
  return static_cast<RandomKind>(code);
}

inline void require(bool ok, const char* message) {
  if (!ok) throw std::invalid_argument(message);
}

// Each kernel argument is a callable with the header's signature plus a trailing void* stream.
template <typename ProjectFactored, typename ProjectDense, typename ScoreTopk, typename Precondition,
          typename GroupPoolScores, typename Digest>
void define_ops(py::module_& m, ProjectFactored project_factored, ProjectDense project_dense, ScoreTopk score_topk,
                Precondition precondition, GroupPoolScores group_pool_scores, Digest digest) {
  m.def(
      "project_factored",
      [project_factored](std::uintptr_t A, std::uintptr_t G, int dtype, std::uintptr_t mask, std::uintptr_t P_in,
                         std::uintptr_t P_out, int64_t B, int64_t T, int64_t d_in, int64_t d_out, int64_t k_in,
                         int64_t k_out, std::uintptr_t out, std::uintptr_t stream) {
        require(B >= 0 && T >= 0 && d_in >= 1 && d_out >= 1 && k_in >= 1 && k_out >= 1,
                "project_factored: sizes must be B, T >= 0 and d_in, d_out, k_in, k_out >= 1");
        py::gil_scoped_release release;
        project_factored(ptr<const void>(A), ptr<const void>(G), to_dtype(dtype), ptr<const float>(mask),
                         ptr<const float>(P_in), ptr<const float>(P_out), B, T, d_in, d_out, k_in, k_out,
                         ptr<float>(out), ptr<void>(stream));
      },
      "out (B,k_out,k_in) = sum_t m[b,t] (G[b,t] P_out)^T (A[b,t] P_in)");

  m.def(
      "project_dense",
      [project_dense](std::uintptr_t X, int dtype, int64_t B, int64_t p, int64_t ldx, int64_t row_offset, int64_t k,
                      uint32_t seed, int kind, std::uintptr_t out, std::uintptr_t stream) {
        require(B >= 0 && p >= 0 && k >= 1 && row_offset >= 0 && ldx >= p,
                "project_dense: sizes must be B, p, row_offset >= 0, k >= 1 and ldx >= p");
        py::gil_scoped_release release;
        project_dense(ptr<const void>(X), to_dtype(dtype), B, p, ldx, row_offset, k, seed, to_kind(kind),
                      ptr<float>(out), ptr<void>(stream));
      },
      "out (B,k) += X (B,p) @ R[row_offset:row_offset+p] with R hashed from (seed, row, col)");

  m.def(
      "score_topk",
      [score_topk](std::uintptr_t Q, std::uintptr_t X, int dtype, int64_t q, int64_t n, int64_t k, int64_t topk,
                   bool normalize, int64_t index_offset, std::uintptr_t values, std::uintptr_t indices,
                   std::uintptr_t stream) {
        require(q >= 0 && n >= 0 && k >= 1 && topk >= 1 && index_offset >= 0,
                "score_topk: sizes must be q, n, index_offset >= 0 and k, topk >= 1");
        py::gil_scoped_release release;
        score_topk(ptr<const float>(Q), ptr<const void>(X), to_dtype(dtype), q, n, k, topk, normalize,
                   index_offset, ptr<float>(values), ptr<int64_t>(indices), ptr<void>(stream));
      },
      "top-k of Q (q,k) . X (n,k)^T per query, streamed; values (q,topk), indices (q,topk)");

  m.def(
      "precondition",
      [precondition](std::uintptr_t G, int dtype, std::uintptr_t Q_G, std::uintptr_t Q_A, std::uintptr_t Lam,
                     float damping, int64_t B, int64_t k_out, int64_t k_in, std::uintptr_t out, std::uintptr_t stream) {
        require(B >= 0 && k_out >= 1 && k_in >= 1, "precondition: sizes must be B >= 0 and k_out, k_in >= 1");
        require(std::isfinite(damping) && damping >= 0, "precondition: damping must be finite and >= 0");
        py::gil_scoped_release release;
        precondition(ptr<const void>(G), to_dtype(dtype), ptr<const float>(Q_G), ptr<const float>(Q_A),
                     ptr<const float>(Lam), damping, B, k_out, k_in, ptr<float>(out), ptr<void>(stream));
      },
      "out (B,k_out,k_in) = Q_G [(Q_G^T G[b] Q_A) / (Lam + damping)] Q_A^T per sample, fused");

  m.def(
      "group_pool_scores",
      [group_pool_scores](std::uintptr_t Q, std::uintptr_t X, int dtype, int64_t q, int64_t d, std::uintptr_t offsets,
                          std::uintptr_t members, int64_t G, std::uintptr_t out, std::uintptr_t stream) {
        require(q >= 0 && d >= 1 && G >= 0, "group_pool_scores: sizes must be q, G >= 0 and d >= 1");
        py::gil_scoped_release release;
        group_pool_scores(ptr<const float>(Q), ptr<const void>(X), to_dtype(dtype), q, d, ptr<const int64_t>(offsets),
                          ptr<const int64_t>(members), G, ptr<float>(out), ptr<void>(stream));
      },
      "out (q,G) = sum_{i in S_g} softmax_{i in S_g}(|Q X_i|) Q X_i, groups S_g = members[offsets[g]:offsets[g+1]]");

  m.def(
      "digest",
      [digest](std::uintptr_t data, int64_t rows, int64_t row_bytes, std::uintptr_t out, std::uintptr_t stream) {
        require(rows >= 0 && row_bytes >= 0, "digest: sizes must be rows, row_bytes >= 0");
        py::gil_scoped_release release;
        digest(ptr<const void>(data), rows, row_bytes, ptr<uint64_t>(out), ptr<void>(stream));
      },
      "out (rows,2) = 128-bit digest of each row's row_bytes bytes (airtrace/digest.h)");
}

}  // namespace airtrace::bind
