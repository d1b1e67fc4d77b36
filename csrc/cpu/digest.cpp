// out[r] = the 128-bit digest of row r's bytes (digest.h): sums over 8 KiB blocks of stripe products and raw stripes.
//
// Work items are (row, block) pairs, taken by the threads in contiguous shares; a thread adds its
// blocks' (x_b, y_b) into per-row partial sums, which are added afterwards (sums mod 2^64 commute,
// so the result does not depend on the thread count). Inside a block the stripes of one class
// c = t mod 4 go to one accumulator, so four stripes take one 32 x 32 -> 64-bit vector multiply
// (AVX2 and AVX-512 builds; the generic build multiplies in scalar registers).
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "airtrace/digest.h"
#include "parallel.h"
#include "variant.h"

namespace airtrace::AIRTRACE_ISA {
namespace {

// The keys of a block's stripes, K[2t] | K[2t+1] << 32, computed once.
struct Keys {
  alignas(64) uint64_t k[kDigestStripes];
  Keys() {
    for (uint32_t t = 0; t < kDigestStripes; ++t)
      k[t] = digest_key(2 * t) | (static_cast<uint64_t>(digest_key(2 * t + 1)) << 32);
  }
};

const Keys& keys() {
  static const Keys table;
  return table;
}

// Adds the class sums of the `stripes` full stripes at p (a multiple of 4) to P[4], R[4]. With a = stripe ^ key,
// the product is (low 32 bits of a) * (high 32 bits of a): one vpmuludq per four stripes, which sit in the
// vector's four 64-bit lanes in class order.
void block_sums(const unsigned char* p, int64_t stripes, const uint64_t* K, uint64_t P[4], uint64_t R[4]) {
#if defined(__AVX2__)
  __m256i prod = _mm256_setzero_si256(), raw = _mm256_setzero_si256();
  for (int64_t t = 0; t < stripes; t += 4) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8 * t));
    const __m256i a = _mm256_xor_si256(v, _mm256_load_si256(reinterpret_cast<const __m256i*>(K + t)));
    prod = _mm256_add_epi64(prod, _mm256_mul_epu32(a, _mm256_srli_epi64(a, 32)));
    raw = _mm256_add_epi64(raw, v);
  }
  uint64_t p4[4], r4[4];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p4), prod);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(r4), raw);
  for (int c = 0; c < 4; ++c) P[c] += p4[c], R[c] += r4[c];
#else
  uint64_t p4[4] = {}, r4[4] = {};
  for (int64_t t = 0; t < stripes; t += 4) {
    for (int c = 0; c < 4; ++c) {
      uint64_t v;
      std::memcpy(&v, p + 8 * (t + c), sizeof v);
      const uint64_t a = v ^ K[t + c];
      p4[c] += static_cast<uint64_t>(static_cast<uint32_t>(a)) * (a >> 32);
      r4[c] += v;
    }
  }
  for (int c = 0; c < 4; ++c) P[c] += p4[c], R[c] += r4[c];
#endif
}

// (x_b, y_b) of block b of a row: `bytes` bytes at p (at most 8 * kDigestStripes).
void digest_one_block(const unsigned char* p, int64_t bytes, uint64_t b, uint64_t* x, uint64_t* y) {
  const uint64_t* K = keys().k;
  uint64_t P[4] = {}, R[4] = {};
  const int64_t full = bytes / 8 / 4 * 4;  // stripes handled four at a time
  block_sums(p, full, K, P, R);
  for (int64_t t = full; t * 8 < bytes; ++t) {  // the rest, the last stripe zero-padded
    unsigned char stripe[8] = {};
    std::memcpy(stripe, p + 8 * t, static_cast<size_t>(bytes - 8 * t < 8 ? bytes - 8 * t : 8));
    uint32_t lo, hi;
    std::memcpy(&lo, stripe, 4);
    std::memcpy(&hi, stripe + 4, 4);
    P[t % 4] += digest_product(lo, hi, static_cast<uint32_t>(t));
    R[t % 4] += (static_cast<uint64_t>(hi) << 32) | lo;
  }
  digest_block(b, P, R, x, y);
}

}  // namespace

// Inputs below this many bytes are digested by one thread: a team costs more than it saves there (one thread
// reads ~3.5 GB/s, so 4 MiB is ~1 ms; on a busy machine each team start can wait for a descheduled thread, and
// a 135M-parameter model's 272 tensors took 2.5-5 s with teams vs 0.15-0.22 s on one thread at load 9.6).
constexpr int64_t kParallelBytes = int64_t{1} << 22;

void digest_cpu(const void* data, int64_t rows, int64_t row_bytes, uint64_t* out) {
  constexpr int64_t kBlockBytes = 8 * kDigestStripes;
  const int64_t blocks = (row_bytes + kBlockBytes - 1) / kBlockBytes;
  const int64_t items = rows * blocks;
  const auto* base = static_cast<const unsigned char*>(data);
  const int threads = cpu::max_threads();
  cpu::Buffer<uint64_t> sums(static_cast<size_t>(threads) * rows * 2, 0);
  keys();  // build the table before the threads start
#pragma omp parallel num_threads(threads) if (items > 1 && rows * row_bytes >= kParallelBytes)
  {
    int64_t begin, end;
    cpu::thread_share(items, cpu::thread_index(), cpu::team_size(), &begin, &end);
    uint64_t* mine = sums.data() + static_cast<int64_t>(cpu::thread_index()) * rows * 2;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / blocks, b = item % blocks;
      const int64_t offset = b * kBlockBytes;
      const int64_t bytes = row_bytes - offset < kBlockBytes ? row_bytes - offset : kBlockBytes;
      uint64_t x, y;
      digest_one_block(base + r * row_bytes + offset, bytes, static_cast<uint64_t>(b), &x, &y);
      mine[2 * r] += x;
      mine[2 * r + 1] += y;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    uint64_t sum_x = 0, sum_y = 0;
    for (int t = 0; t < threads; ++t) {
      sum_x += sums[(static_cast<int64_t>(t) * rows + r) * 2];
      sum_y += sums[(static_cast<int64_t>(t) * rows + r) * 2 + 1];
    }
    digest_finish(sum_x, sum_y, static_cast<uint64_t>(row_bytes), out + 2 * r);
  }
}

}  // namespace airtrace::AIRTRACE_ISA
