// out[x, g] = sum_{i in S_g} softmax_{i in S_g}(|s_i|) s_i with s_i = Q[x] . X[i] (0 for an empty group).
//
// Q is packed once, transposed into panels of up to 64 queries per block of kDepth features,
// as in score_topk. Queries are cut into blocks small enough that a block's packed panels stay
// in L2 (all of them when q is moderate), groups into blocks of whole groups with about
// kBlockMembers members; threads take (query block, group block) items in turn. Within an
// item the members are walked in CSR order kTileRows at a time: the gathered rows (fp32/bf16
// in place, fp16 converted) are multiplied with every panel of the query block by the GEMM
// micro-kernel, so each gathered row is reused by all queries of the block while it is in
// cache. The (rows, queries) score tile then updates each query's running softmax state of the
// current group (max of |s|, sum of exp, exp-weighted sum of s; 16 queries per vector), which
// carries over when a group spans tiles. Work memory is O(threads * kTileRows * queries per
// block); only member dot products are computed and the (q, n) matrix is never formed.
#include "airtrace/group_pool_scores.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "convert.h"
#include "microkernel.h"
#include "parallel.h"
#include "variant.h"

namespace airtrace::AIRTRACE_ISA {
namespace {

constexpr int64_t kTileRows = 128;               // member rows per GEMM call
constexpr int64_t kDepth = 256;                  // features per packed block
constexpr int64_t kPanel = cpu::kMaxPanel;       // queries per micro-kernel panel
constexpr int64_t kMaxQueryBlock = 4 * kPanel;   // queries per work item, at most
constexpr int64_t kQueryBlockBytes = 512 << 10;  // packed queries of one item, at most (L2)
constexpr int64_t kBlockMembers = 1024;          // members per group block, at most (unless one group has more)
constexpr int64_t kBlockGroups = 4096;           // groups per group block, at most
constexpr int64_t kParallelWork = int64_t{1} << 22;  // multiply-adds below which one thread does it all
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

#if defined(__AVX512F__)
// e^x for x <= 0 (Cephes expf polynomial, about 1 ulp); 0 below -104, for -inf and for NaN.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);  // x - k ln 2, in two parts
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, k);
}
#endif

// Running softmax state of one group for the `lanes` queries of a block (lanes a multiple of 16):
// peak = max |s| so far, den = sum exp(|s| - peak), num = sum exp(|s| - peak) s.
class PoolState {
 public:
  explicit PoolState(int64_t lanes) : peak_(lanes), den_(lanes), num_(lanes) {}

  void reset(int64_t lanes) {
    std::fill_n(peak_.begin(), lanes, kNegInf);
    std::fill_n(den_.begin(), lanes, 0.0f);
    std::fill_n(num_.begin(), lanes, 0.0f);
  }

  // Adds the scores S[r * ldc + j] of tile rows r in [r0, r1) (r1 > r0), queries j < lanes.
  void update(const float* S, int64_t ldc, int64_t r0, int64_t r1, int64_t lanes) {
#if defined(__AVX512F__)
    for (int64_t j = 0; j < lanes; j += cpu::kLanes) {
      __m512 segment_peak = _mm512_set1_ps(kNegInf);
      for (int64_t r = r0; r < r1; ++r) {
        segment_peak = _mm512_max_ps(segment_peak, _mm512_abs_ps(_mm512_loadu_ps(S + r * ldc + j)));
      }
      const __m512 old_peak = _mm512_loadu_ps(peak_.data() + j);
      const __m512 peak = _mm512_max_ps(old_peak, segment_peak);
      const __m512 scale = exp_nonpositive(_mm512_sub_ps(old_peak, peak));  // 0 while old_peak = -inf
      __m512 den = _mm512_mul_ps(_mm512_loadu_ps(den_.data() + j), scale);
      __m512 num = _mm512_mul_ps(_mm512_loadu_ps(num_.data() + j), scale);
      for (int64_t r = r0; r < r1; ++r) {
        const __m512 s = _mm512_loadu_ps(S + r * ldc + j);
        const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_abs_ps(s), peak));
        den = _mm512_add_ps(den, e);
        num = _mm512_fmadd_ps(e, s, num);
      }
      _mm512_storeu_ps(peak_.data() + j, peak);
      _mm512_storeu_ps(den_.data() + j, den);
      _mm512_storeu_ps(num_.data() + j, num);
    }
#else
    for (int64_t j = 0; j < lanes; ++j) {
      float peak = peak_[j];
      for (int64_t r = r0; r < r1; ++r) peak = std::max(peak, std::fabs(S[r * ldc + j]));
      const float scale = peak_[j] == kNegInf ? 0.0f : std::exp(peak_[j] - peak);
      float den = den_[j] * scale, num = num_[j] * scale;
      for (int64_t r = r0; r < r1; ++r) {
        const float s = S[r * ldc + j];
        const float e = std::exp(std::fabs(s) - peak);
        den += e;
        num += e * s;
      }
      peak_[j] = peak;
      den_[j] = den;
      num_[j] = num;
    }
#endif
  }

  // out[j * G + g] = num / den for j < width. den >= 1 for a non-empty group (the peak adds
  // exp(0)), 0 for an empty one (num = 0 gives 0); NaN propagates.
  void finish(float* out, int64_t G, int64_t g, int64_t width) const {
    for (int64_t j = 0; j < width; ++j) out[j * G + g] = num_[j] / std::max(den_[j], 1.0f);
  }

 private:
  cpu::Buffer<float> peak_, den_, num_;
};

class Pooler {
 public:
  Pooler(const float* Q, const void* X, DType dtype, int64_t q, int64_t d, const int64_t* offsets,
         const int64_t* members, int64_t G, bool parallel)
      : X_(X), dtype_(dtype), q_(q), d_(d), ldq_(round_up(q, cpu::kLanes)), offsets_(offsets), members_(members),
        G_(G), packed_(ldq_ * d) {
    const int64_t fit = std::max<int64_t>(kPanel, kQueryBlockBytes / (int64_t{4} * d) / kPanel * kPanel);
    const int64_t blocks = ceil_div(q, std::min(kMaxQueryBlock, fit));
    query_block_ = round_up(ceil_div(q, blocks), kPanel);
    pack_queries(Q, parallel);
  }

  int64_t query_blocks() const { return ceil_div(q_, query_block_); }

  // Per-thread scratch: row pointers and converted fp16 rows of one feature block, the score
  // tile (zeroed, so lanes past the last query hold finite values), the softmax state.
  struct Scratch {
    cpu::Buffer<float> converted, scores;
    cpu::Buffer<const float*> rows;
    cpu::Buffer<const cpu::Bf16*> bf16_rows;
    PoolState pool;
    explicit Scratch(int64_t lanes) : pool(lanes) {}
  };

  Scratch make_scratch() const {
    Scratch s(query_block_);
    if (dtype_ == DType::f16) s.converted.resize(kTileRows * kDepth);
    s.scores.assign(kTileRows * query_block_, 0.0f);
    s.rows.resize(kTileRows);
    s.bf16_rows.resize(kTileRows);
    return s;
  }

  // Groups [g0, g1) for query block `block`: out[i, g] for its queries i.
  void pool_groups(int64_t block, int64_t g0, int64_t g1, Scratch& s, float* out) const {
    const int64_t i0 = block * query_block_, width = std::min(query_block_, q_ - i0);
    const int64_t lanes = round_up(width, cpu::kLanes);
    float* out_block = out + i0 * G_;
    const int64_t p_end = offsets_[g1];
    int64_t g = g0;
    for (int64_t c0 = offsets_[g0]; c0 < p_end; c0 += kTileRows) {
      const int64_t c1 = std::min(p_end, c0 + kTileRows);
      score_tile(c0, c1 - c0, i0, width, s);
      for (; g < g1 && offsets_[g] < c1; ++g) {
        if (offsets_[g] >= c0) s.pool.reset(lanes);  // group g starts in this tile
        const int64_t r0 = std::max(offsets_[g], c0) - c0, r1 = std::min(offsets_[g + 1], c1) - c0;
        if (r1 > r0) s.pool.update(s.scores.data(), query_block_, r0, r1, lanes);
        if (offsets_[g + 1] > c1) break;  // continues in the next tile
        s.pool.finish(out_block, G_, g, width);
      }
    }
    for (; g < g1; ++g) {  // empty groups after the last member
      s.pool.reset(lanes);
      s.pool.finish(out_block, G_, g, width);
    }
  }

 private:
  // scores[r * query_block + j] = Q[i0 + j] . X[members[c0 + r]] for r < m, j < width.
  void score_tile(int64_t c0, int64_t m, int64_t i0, int64_t width, Scratch& s) const {
    for (int64_t d0 = 0; d0 < d_; d0 += kDepth) {
      const int64_t depth = std::min(kDepth, d_ - d0);
      load_rows(c0, m, d0, depth, s);
      for (int64_t p0 = 0; p0 < width; p0 += kPanel) {
        const int64_t pw = std::min(kPanel, width - p0);
        const int64_t ldb = round_up(pw, cpu::kLanes);
        float* scores = s.scores.data() + p0;
        if (dtype_ == DType::bf16) {
          cpu::gemm(s.bf16_rows.data(), m, panel(d0, i0 + p0), ldb, depth, pw, scores, query_block_, d0 > 0);
        } else {
          cpu::gemm(s.rows.data(), m, panel(d0, i0 + p0), ldb, depth, pw, scores, query_block_, d0 > 0);
        }
      }
    }
  }

  // Row pointers to features [d0, d0 + depth) of the member rows at CSR positions c0 + r:
  // fp32 and bf16 in place, fp16 converted to fp32.
  void load_rows(int64_t c0, int64_t m, int64_t d0, int64_t depth, Scratch& s) const {
    for (int64_t r = 0; r < m; ++r) {
      const int64_t offset = members_[c0 + r] * d_ + d0;
      if (dtype_ == DType::bf16) {
        s.bf16_rows[r] = static_cast<const cpu::Bf16*>(X_) + offset;
      } else if (dtype_ == DType::f32) {
        s.rows[r] = static_cast<const float*>(X_) + offset;
      } else {
        float* dst = s.converted.data() + r * kDepth;
        cpu::load_row(cpu::element_ptr(X_, dtype_, offset), dtype_, depth, dst);
        s.rows[r] = dst;
      }
    }
  }

  // Q^T, feature block by feature block, each block split into panels of kPanel queries whose
  // rows are padded to a multiple of 16: panel(d0, p0)[dd * width16 + i] = Q[p0 + i, d0 + dd].
  void pack_queries(const float* Q, bool parallel) {
#pragma omp parallel for if (parallel)
    for (int64_t i = 0; i < q_; ++i) {
      const float* row = Q + i * d_;
      const int64_t p0 = i / kPanel * kPanel, width16 = round_up(std::min(kPanel, q_ - p0), cpu::kLanes);
      for (int64_t d0 = 0; d0 < d_; d0 += kDepth) {
        float* dst = panel(d0, p0) + (i - p0);
        for (int64_t dd = 0; dd < std::min(kDepth, d_ - d0); ++dd) dst[dd * width16] = row[d0 + dd];
      }
    }
  }

  float* panel(int64_t d0, int64_t p0) { return packed_.data() + d0 * ldq_ + p0 * std::min(kDepth, d_ - d0); }
  const float* panel(int64_t d0, int64_t p0) const {
    return packed_.data() + d0 * ldq_ + p0 * std::min(kDepth, d_ - d0);
  }

  const void* X_;
  DType dtype_;
  int64_t q_, d_, ldq_;
  const int64_t* offsets_;
  const int64_t* members_;
  int64_t G_;
  int64_t query_block_ = kPanel;  // a multiple of kPanel, so blocks start at panel boundaries
  cpu::Buffer<float> packed_;
};

// Start of each block of whole groups (and G at the end): a block takes groups while it holds
// at most `target` members and kBlockGroups groups; a larger group is a block of its own.
cpu::Buffer<int64_t> group_blocks(const int64_t* offsets, int64_t G, int64_t target) {
  cpu::Buffer<int64_t> starts;
  for (int64_t g0 = 0; g0 < G;) {
    starts.push_back(g0);
    int64_t g1 = g0 + 1;
    while (g1 < G && g1 - g0 < kBlockGroups && offsets[g1 + 1] - offsets[g0] <= target) ++g1;
    g0 = g1;
  }
  starts.push_back(G);
  return starts;
}

}  // namespace

void group_pool_scores_cpu(const float* Q, const void* X, DType dtype, int64_t q, int64_t d, const int64_t* offsets,
                           const int64_t* members, int64_t G, float* out) {
  if (q == 0 || G == 0) return;
  // Small problems run on one thread: a parallel region costs more than they do.
  const bool parallel = q * offsets[G] * d >= kParallelWork;
  const Pooler pooler(Q, X, dtype, q, d, offsets, members, G, parallel);
  const int64_t query_blocks = pooler.query_blocks();
  // About four items per thread when the problem is small, kBlockMembers members otherwise.
  const int64_t per_item = ceil_div(offsets[G] * query_blocks, int64_t{4} * cpu::max_threads());
  const cpu::Buffer<int64_t> starts = group_blocks(offsets, G, std::clamp(per_item, kTileRows, kBlockMembers));
  const int64_t group_blocks_count = static_cast<int64_t>(starts.size()) - 1;
  const int64_t items = query_blocks * group_blocks_count;
  cpu::Buffer<Pooler::Scratch> scratch = cpu::per_thread([&] { return pooler.make_scratch(); });
#pragma omp parallel if (parallel)
  {
    Pooler::Scratch& s = scratch[cpu::thread_index()];
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < items; ++t) {
      const int64_t b = t % group_blocks_count;
      pooler.pool_groups(t / group_blocks_count, starts[b], starts[b + 1], s, out);
    }
  }
}

}  // namespace airtrace::AIRTRACE_ISA
