// out[b] = sum_t m[b,t] (G[b,t] P_out)^T (A[b,t] P_in)   (B, k_out, k_in), fp32 accumulation.
//
// Work items are (sample b, tile of kTileTokens tokens), split into one contiguous range per
// thread. Per item the unmasked token rows are projected with the GEMM micro-kernel,
// AP = A_tile P_in and GP = G_tile P_out (kGroupTokens rows at a time; fp32 and bf16 rows are
// read in place, fp16 rows converted to fp32 group by group), then acc += (m GP)^T AP.
// A sample whose tiles straddle threads is summed from per-thread partials afterwards.
#include "airtrace/project_factored.h"

#include <algorithm>

#include "convert.h"
#include "microkernel.h"
#include "parallel.h"
#include "variant.h"

namespace airtrace::AIRTRACE_ISA {
namespace {

constexpr int64_t kTileTokens = 64;
constexpr int64_t kGroupTokens = 24;  // a multiple of every micro-kernel row count

int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// A projection matrix P (rows, cols) as a micro-kernel panel with ld = cols rounded up to 16:
// P itself when cols is a multiple of 16, else a zero-padded copy.
class Panel {
 public:
  Panel(const float* P, int64_t rows, int64_t cols) : ld_(round_up(cols, cpu::kLanes)), data_(P) {
    if (ld_ == cols) return;
    padded_.assign(rows * ld_, 0.0f);
    for (int64_t r = 0; r < rows; ++r) std::copy(P + r * cols, P + (r + 1) * cols, padded_.data() + r * ld_);
    data_ = padded_.data();
  }
  Panel(const Panel&) = delete;
  Panel& operator=(const Panel&) = delete;

  const float* data() const { return data_; }
  int64_t ld() const { return ld_; }

 private:
  int64_t ld_;
  const float* data_;
  cpu::Buffer<float> padded_;
};

class FactoredProjection {
 public:
  FactoredProjection(const void* A, const void* G, DType dtype, const float* mask, const float* P_in,
                     const float* P_out, int64_t T, int64_t d_in, int64_t d_out, int64_t k_in, int64_t k_out)
      : A_(A), G_(G), dtype_(dtype), mask_(mask), T_(T), d_in_(d_in), d_out_(d_out), k_in_(k_in),
        k_out_(k_out), P_in_(P_in, d_in, k_in), P_out_(P_out, d_out, k_out), ld_in_(P_in_.ld()),
        ld_out_(P_out_.ld()) {}

  int64_t acc_size() const { return k_out_ * ld_in_; }

  // Per-thread scratch: kept tokens, row pointers, converted fp16 rows, projections and the
  // (k_out, ld_in) accumulator.
  struct Scratch {
    cpu::Buffer<int64_t> token;
    cpu::Buffer<float> weight, converted, ap, gp, gpt, acc;
    cpu::Buffer<const float*> rows, gpt_rows;
    cpu::Buffer<const cpu::Bf16*> bf16_rows;
  };

  Scratch make_scratch() const {
    Scratch s;
    s.token.resize(kTileTokens);
    s.weight.resize(kTileTokens);
    if (dtype_ == DType::f16) s.converted.resize(kGroupTokens * std::max(d_in_, d_out_));
    s.ap.assign(kTileTokens * ld_in_, 0.0f);
    s.gp.assign(kTileTokens * ld_out_, 0.0f);
    s.gpt.resize(k_out_ * kTileTokens);
    s.acc.resize(acc_size());
    s.rows.resize(kGroupTokens);
    s.bf16_rows.resize(kGroupTokens);
    s.gpt_rows.resize(k_out_);
    return s;
  }

  // s.acc += sum_{t0 <= t < t1} m[b,t] (G[b,t] P_out)^T (A[b,t] P_in).
  void add_tile(int64_t b, int64_t t0, int64_t t1, Scratch& s) const {
    const int64_t n = gather_tokens(b, t0, t1, s);
    if (n == 0) return;
    project(A_, d_in_, P_in_, k_in_, n, s, s.ap.data());
    project(G_, d_out_, P_out_, k_out_, n, s, s.gp.data());
    for (int64_t r = 0; r < k_out_; ++r) {
      float* dst = s.gpt.data() + r * n;
      for (int64_t i = 0; i < n; ++i) dst[i] = s.weight[i] * s.gp[i * ld_out_ + r];
      s.gpt_rows[r] = dst;
    }
    cpu::gemm(s.gpt_rows.data(), k_out_, s.ap.data(), ld_in_, n, k_in_, s.acc.data(), ld_in_, true);
  }

  // dst (k_out, k_in) = acc without the padding columns.
  void store(const cpu::Buffer<float>& acc, float* dst) const {
    for (int64_t r = 0; r < k_out_; ++r) std::copy_n(acc.data() + r * ld_in_, k_in_, dst + r * k_in_);
  }

 private:
  // Row indices and weights of the unmasked tokens of sample b in [t0, t1); returns their count.
  int64_t gather_tokens(int64_t b, int64_t t0, int64_t t1, Scratch& s) const {
    int64_t n = 0;
    for (int64_t t = t0; t < t1; ++t) {
      const float m = mask_ ? mask_[b * T_ + t] : 1.0f;
      if (m == 0.0f) continue;
      s.token[n] = b * T_ + t;
      s.weight[n++] = m;
    }
    return n;
  }

  // dst (n, ld) = X[token[i]] . P for the n gathered tokens, X rows of `width` elements:
  // fp32 and bf16 rows are read in place, fp16 rows are converted to fp32 group by group.
  void project(const void* X, int64_t width, const Panel& P, int64_t k, int64_t n, Scratch& s, float* dst) const {
    const int64_t ld = P.ld();
    for (int64_t i0 = 0; i0 < n; i0 += kGroupTokens) {
      const int64_t m = std::min(kGroupTokens, n - i0);
      float* out = dst + i0 * ld;
      if (dtype_ == DType::bf16) {
        for (int64_t i = 0; i < m; ++i) s.bf16_rows[i] = static_cast<const cpu::Bf16*>(X) + s.token[i0 + i] * width;
        cpu::gemm(s.bf16_rows.data(), m, P.data(), ld, width, k, out, ld, false);
        continue;
      }
      for (int64_t i = 0; i < m; ++i) {
        const int64_t index = s.token[i0 + i];
        if (dtype_ == DType::f32) {
          s.rows[i] = static_cast<const float*>(X) + index * width;
        } else {
          float* converted = s.converted.data() + i * width;
          cpu::load_row(cpu::row_ptr(X, dtype_, index, width), dtype_, width, converted);
          s.rows[i] = converted;
        }
      }
      cpu::gemm(s.rows.data(), m, P.data(), ld, width, k, out, ld, false);
    }
  }

  const void* A_;
  const void* G_;
  DType dtype_;
  const float* mask_;
  int64_t T_, d_in_, d_out_, k_in_, k_out_;
  Panel P_in_, P_out_;
  int64_t ld_in_, ld_out_;
};

}  // namespace

void project_factored_cpu(const void* A, const void* G, DType dtype, const float* mask, const float* P_in,
                          const float* P_out, int64_t B, int64_t T, int64_t d_in, int64_t d_out, int64_t k_in,
                          int64_t k_out, float* out) {
  const FactoredProjection proj(A, G, dtype, mask, P_in, P_out, T, d_in, d_out, k_in, k_out);
  const int64_t tiles = (T + kTileTokens - 1) / kTileTokens;
  const int64_t items = B * tiles;
  const int64_t out_size = k_out * k_in;
  std::fill(out, out + B * out_size, 0.0f);
  // Two partial sums per thread: the samples its item range starts and ends inside.
  const int slots = 2 * cpu::max_threads();
  cpu::Buffer<int64_t> partial_sample(slots, -1);
  cpu::Buffer<float> partial(slots * out_size);
  cpu::Buffer<FactoredProjection::Scratch> scratch = cpu::per_thread([&] { return proj.make_scratch(); });
#pragma omp parallel
  {
    FactoredProjection::Scratch& s = scratch[cpu::thread_index()];
    int64_t begin, end;
    cpu::thread_share(items, cpu::thread_index(), cpu::team_size(), &begin, &end);
    for (int64_t item = begin; item < end;) {
      const int64_t b = item / tiles, first = item % tiles, last = std::min(tiles, first + end - item);
      std::fill(s.acc.begin(), s.acc.end(), 0.0f);
      for (int64_t tile = first; tile < last; ++tile)
        proj.add_tile(b, tile * kTileTokens, std::min(T, (tile + 1) * kTileTokens), s);
      if (first == 0 && last == tiles) {
        proj.store(s.acc, out + b * out_size);
      } else {
        const int slot = 2 * cpu::thread_index() + (item == begin ? 0 : 1);
        partial_sample[slot] = b;
        proj.store(s.acc, partial.data() + slot * out_size);
      }
      item += last - first;
    }
  }
  for (int slot = 0; slot < slots; ++slot) {
    if (partial_sample[slot] < 0) continue;
    float* dst = out + partial_sample[slot] * out_size;
    for (int64_t i = 0; i < out_size; ++i) dst[i] += partial[slot * out_size + i];
  }
}

}  // namespace airtrace::AIRTRACE_ISA
