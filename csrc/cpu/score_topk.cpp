// values[i], indices[i] = top-k over j of s[i, j] = Q[i] . X[j] (cosine if normalize), streamed.
//
// Q is packed once, transposed into panels of up to 64 queries per block of kDepth features
// (pre-scaled by 1 / max(|Q_i|, 1e-12) for cosine; squared norms are summed in double, so any
// finite norm of fp32 / bf16 / fp16 features is exact to fp32 rounding, never inf or 0). Threads take tiles of kTileRows rows of X in
// turn; per feature block the tile's rows (fp32/bf16 in place, fp16 converted) are multiplied with
// every query panel by the GEMM micro-kernel into a (tile, q) score buffer. Each score is then
// compared once with its query's current k-th best, and only those that can enter go into the
// thread's per-query bounded heap. The thread heaps are merged at the end, so work memory is
// O(threads * (q * topk + kTileRows * q)) and never O(q * n).
#include "airtrace/score_topk.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "convert.h"
#include "microkernel.h"
#include "parallel.h"
#include "variant.h"

namespace airtrace::AIRTRACE_ISA {
namespace {

constexpr int64_t kTileRows = 192;
constexpr int64_t kDepth = 256;
constexpr int64_t kPanel = cpu::kMaxPanel;
constexpr float kNormEps = 1e-12f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// sum_d x[d]^2 in double (x fp32 or bf16: a square of any fp32 fits), 16 independent partial sums
// so the loop vectorises.
template <typename T>
double sum_squares(const T* x, int64_t count) {
  double partial[cpu::kLanes] = {};
  int64_t d = 0;
  for (; d + cpu::kLanes <= count; d += cpu::kLanes)
    for (int l = 0; l < cpu::kLanes; ++l) {
      const double v = cpu::to_float(x[d + l]);
      partial[l] += v * v;
    }
  for (; d < count; ++d) {
    const double v = cpu::to_float(x[d]);
    partial[0] += v * v;
  }
  double sum = 0.0;
  for (double p : partial) sum += p;
  return sum;
}

// 1 / max(sqrt(sumsq), 1e-12), rounded once to fp32.
float inverse_norm(double sumsq) { return static_cast<float>(1.0 / std::max(std::sqrt(sumsq), double{kNormEps})); }

struct Candidate {
  float value;
  int64_t index;
};

// a ranks before b: larger value first, equal values by lower index. A NaN score (float32 overflow
// inside Q . X) ranks above every number, as on the other backends, so that the caller sees it.
bool ranks_before(const Candidate& a, const Candidate& b) {
  const bool a_nan = std::isnan(a.value), b_nan = std::isnan(b.value);
  if (a_nan || b_nan) return a_nan && (!b_nan || a.index < b.index);
  return a.value > b.value || (a.value == b.value && a.index < b.index);
}

// One thread's best `capacity` candidates per query, as heaps whose root is the worst kept one;
// threshold[i] is that root's value once query i's heap is full (-inf before), so a score below
// it is rejected with one comparison (which a NaN score passes).
class ThreadTopK {
 public:
  ThreadTopK(int64_t q, int64_t capacity)
      : capacity_(capacity), heap_(q * capacity), size_(q, 0), threshold_(q, kNegInf) {}

  // Offers scores row[j] * scale of one X row (global index `index`) to the q queries.
  void offer_row(const float* row, float scale, int64_t q, int64_t index) {
    int64_t j = 0;
#if defined(__AVX512F__)
    for (; j < q; j += cpu::kLanes) {
      const __mmask16 valid = static_cast<__mmask16>(q - j >= cpu::kLanes ? 0xffff : (1u << (q - j)) - 1u);
      const __m512 values = _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, row + j), _mm512_set1_ps(scale));
      const __m512 thresholds = _mm512_maskz_loadu_ps(valid, threshold_.data() + j);
      for (uint32_t hit = _mm512_mask_cmp_ps_mask(valid, values, thresholds, _CMP_NLT_UQ); hit != 0; hit &= hit - 1) {
        const int64_t query = j + __builtin_ctz(hit);
        offer(query, Candidate{row[query] * scale, index});
      }
    }
#endif
    for (; j < q; ++j)
      if (!(row[j] * scale < threshold_[j])) offer(j, Candidate{row[j] * scale, index});
  }

  void offer(int64_t query, Candidate c) {
    Candidate* h = heap_.data() + query * capacity_;
    int64_t& size = size_[query];
    if (size < capacity_) {
      h[size] = c;
      sift_up(h, size++);
    } else if (ranks_before(c, h[0])) {
      h[0] = c;
      sift_down(h, 0);
    } else {
      return;
    }
    if (size == capacity_) threshold_[query] = h[0].value;
  }

  void append_to(int64_t query, cpu::Buffer<Candidate>* out) const {
    const Candidate* h = heap_.data() + query * capacity_;
    out->insert(out->end(), h, h + size_[query]);
  }

 private:
  static void sift_up(Candidate* h, int64_t i) {
    while (i > 0 && ranks_before(h[(i - 1) / 2], h[i])) {
      std::swap(h[(i - 1) / 2], h[i]);
      i = (i - 1) / 2;
    }
  }

  void sift_down(Candidate* h, int64_t i) const {
    for (;;) {
      int64_t worst = i;
      for (int64_t child = 2 * i + 1; child <= 2 * i + 2 && child < capacity_; ++child)
        if (ranks_before(h[worst], h[child])) worst = child;
      if (worst == i) return;
      std::swap(h[i], h[worst]);
      i = worst;
    }
  }

  int64_t capacity_;
  cpu::Buffer<Candidate> heap_;
  cpu::Buffer<int64_t> size_;
  cpu::Buffer<float> threshold_;
};

class Scorer {
 public:
  Scorer(const float* Q, const void* X, DType dtype, int64_t q, int64_t k, bool normalize)
      : X_(X), dtype_(dtype), q_(q), k_(k), ldc_(round_up(q, cpu::kLanes)), normalize_(normalize),
        packed_(ldc_ * k) {
    pack_queries(Q);
  }

  // Per-thread scratch: row pointers and converted fp16 rows of one feature block, squared
  // row norms, the score tile.
  struct Scratch {
    cpu::Buffer<float> converted, scores;
    cpu::Buffer<double> sumsq;
    cpu::Buffer<const float*> rows;
    cpu::Buffer<const cpu::Bf16*> bf16_rows;
  };

  Scratch make_scratch() const {
    Scratch s;
    if (dtype_ == DType::f16) s.converted.resize(kTileRows * kDepth);
    s.sumsq.resize(kTileRows);
    s.scores.resize(kTileRows * ldc_);
    s.rows.resize(kTileRows);
    s.bf16_rows.resize(kTileRows);
    return s;
  }

  // Scores of X rows [j0, j0 + m) against all queries, offered to `best`.
  void score_tile(int64_t j0, int64_t m, int64_t index_offset, Scratch& s, ThreadTopK& best) const {
    std::fill_n(s.sumsq.begin(), m, 0.0);
    for (int64_t d0 = 0; d0 < k_; d0 += kDepth) {
      const int64_t depth = std::min(kDepth, k_ - d0);
      load_rows(j0, m, d0, depth, s);
      for (int64_t p0 = 0; p0 < q_; p0 += kPanel) {
        const int64_t width = std::min(kPanel, q_ - p0);
        const int64_t ldb = round_up(width, cpu::kLanes);
        float* scores = s.scores.data() + p0;
        if (dtype_ == DType::bf16) {
          cpu::gemm(s.bf16_rows.data(), m, panel(d0, p0), ldb, depth, width, scores, ldc_, d0 > 0);
        } else {
          cpu::gemm(s.rows.data(), m, panel(d0, p0), ldb, depth, width, scores, ldc_, d0 > 0);
        }
      }
    }
    for (int64_t i = 0; i < m; ++i) {
      const float scale = normalize_ ? inverse_norm(s.sumsq[i]) : 1.0f;
      best.offer_row(s.scores.data() + i * ldc_, scale, q_, index_offset + j0 + i);
    }
  }

 private:
  // Q^T, feature block by feature block, each block split into panels of kPanel queries whose
  // rows are padded to a multiple of 16: panel(d0, p0)[d * width16 + i] = Q[p0 + i, d0 + d] / norm.
  void pack_queries(const float* Q) {
#pragma omp parallel for
    for (int64_t i = 0; i < q_; ++i) {
      const float* row = Q + i * k_;
      const float scale = normalize_ ? inverse_norm(sum_squares(row, k_)) : 1.0f;
      const int64_t p0 = i / kPanel * kPanel, width16 = round_up(std::min(kPanel, q_ - p0), cpu::kLanes);
      for (int64_t d0 = 0; d0 < k_; d0 += kDepth) {
        float* dst = panel(d0, p0) + (i - p0);
        for (int64_t d = 0; d < std::min(kDepth, k_ - d0); ++d) dst[d * width16] = row[d0 + d] * scale;
      }
    }
  }

  float* panel(int64_t d0, int64_t p0) { return packed_.data() + d0 * ldc_ + p0 * std::min(kDepth, k_ - d0); }
  const float* panel(int64_t d0, int64_t p0) const {
    return packed_.data() + d0 * ldc_ + p0 * std::min(kDepth, k_ - d0);
  }

  // Row pointers to features [d0, d0 + depth) of X rows j0 + i: fp32 and bf16 in place, fp16
  // converted to fp32; accumulates s.sumsq for cosine.
  void load_rows(int64_t j0, int64_t m, int64_t d0, int64_t depth, Scratch& s) const {
    for (int64_t i = 0; i < m; ++i) {
      const int64_t offset = (j0 + i) * k_ + d0;
      if (dtype_ == DType::bf16) {
        s.bf16_rows[i] = static_cast<const cpu::Bf16*>(X_) + offset;
        if (normalize_) s.sumsq[i] += sum_squares(s.bf16_rows[i], depth);
        continue;
      }
      if (dtype_ == DType::f32) {
        s.rows[i] = static_cast<const float*>(X_) + offset;
      } else {
        float* dst = s.converted.data() + i * kDepth;
        cpu::load_row(cpu::element_ptr(X_, dtype_, offset), dtype_, depth, dst);
        s.rows[i] = dst;
      }
      if (normalize_) s.sumsq[i] += sum_squares(s.rows[i], depth);
    }
  }

  const void* X_;
  DType dtype_;
  int64_t q_, k_, ldc_;
  bool normalize_;
  cpu::Buffer<float> packed_;
};

// values/indices row `query`: the best topk of all threads' candidates, padded with (-inf, -1); `all` is
// scratch with room for every thread's candidates.
void write_query(const cpu::Buffer<ThreadTopK>& per_thread, int64_t query, int64_t topk, float* values,
                 int64_t* indices, cpu::Buffer<Candidate>& all) {
  all.clear();
  for (const ThreadTopK& best : per_thread) best.append_to(query, &all);
  const int64_t kept = std::min<int64_t>(topk, all.size());
  std::partial_sort(all.begin(), all.begin() + kept, all.end(), ranks_before);
  for (int64_t r = 0; r < topk; ++r) {
    values[query * topk + r] = r < kept ? all[r].value : kNegInf;
    indices[query * topk + r] = r < kept ? all[r].index : -1;
  }
}

}  // namespace

void score_topk_cpu(const float* Q, const void* X, DType dtype, int64_t q, int64_t n, int64_t k, int64_t topk,
                    bool normalize, int64_t index_offset, float* values, int64_t* indices) {
  const Scorer scorer(Q, X, dtype, q, k, normalize);
  const int64_t kept = std::min(topk, n);
  cpu::Buffer<ThreadTopK> per_thread(cpu::max_threads(), ThreadTopK(q, kept));
  cpu::Buffer<Scorer::Scratch> scratch = cpu::per_thread([&] { return scorer.make_scratch(); });
  cpu::Buffer<cpu::Buffer<Candidate>> merged = cpu::per_thread([&] {
    cpu::Buffer<Candidate> all;
    all.reserve(kept * cpu::max_threads());
    return all;
  });
  const int64_t tiles = (n + kTileRows - 1) / kTileRows;
#pragma omp parallel
  {
    Scorer::Scratch& s = scratch[cpu::thread_index()];
    ThreadTopK& best = per_thread[cpu::thread_index()];
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < tiles; ++t)
      scorer.score_tile(t * kTileRows, std::min(kTileRows, n - t * kTileRows), index_offset, s, best);
  }
#pragma omp parallel for
  for (int64_t i = 0; i < q; ++i) write_query(per_thread, i, topk, values, indices, merged[cpu::thread_index()]);
}

}  // namespace airtrace::AIRTRACE_ISA
