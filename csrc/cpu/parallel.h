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

// out[0:size] += the sum over threads of fn(begin, end, acc, scratch): each thread runs fn on its contiguous
// share [begin, end) of `count` items with its own scratch from make_scratch() (made before the region, see
// per_thread), thread 0 accumulating into `out`, the others into zeroed buffers of `size` floats that are
// added into `out` afterwards.
template <typename Make, typename F>
void share_and_sum(int64_t count, int64_t size, float* out, Make&& make_scratch, F&& fn) {
  const int threads = max_threads();
  Buffer<float> partial((threads - 1) * size, 0.0f);
  auto scratch = per_thread(make_scratch);
#pragma omp parallel
  {
    const int t = thread_index();
    int64_t begin, end;
    thread_share(count, t, team_size(), &begin, &end);
    fn(begin, end, t == 0 ? out : partial.data() + (t - 1) * size, scratch[t]);
  }
  for (int t = 1; t < threads; ++t)
    for (int64_t i = 0; i < size; ++i) out[i] += partial[(t - 1) * size + i];
}

}  // namespace airtrace::AIRTRACE_ISA::cpu
