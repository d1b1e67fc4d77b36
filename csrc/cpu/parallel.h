// OpenMP helpers that also compile (as one thread) without OpenMP.
#pragma once
#include <cstdint>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "variant.h"

namespace airtrace::AIRTRACE_ISA::cpu {

inline int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// This thread's index and the team size inside a parallel region.
inline int thread_index() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline int team_size() {
#if defined(_OPENMP)
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// One scratch object per thread of the coming parallel regions, each from make(), made before they start.
// Rule: no allocation inside a parallel region. An exception cannot leave a region (the process would
// end), so memory that runs out (std::bad_alloc) must do so here, where it reaches the caller as an error.
template <typename Make>
auto per_thread(Make&& make) {
  Buffer<decltype(make())> out;
  out.reserve(max_threads());
  for (int t = 0; t < max_threads(); ++t) out.push_back(make());
  return out;
}

// [begin, end) of `count` items for thread `index` of `threads`: contiguous, near-equal shares.
inline void thread_share(int64_t count, int index, int threads, int64_t* begin, int64_t* end) {
  *begin = count * index / threads;
  *end = count * (index + 1) / threads;
}

}  // namespace airtrace::AIRTRACE_ISA::cpu
