// Element loads for the CPU kernels: bf16/fp16 -> fp32.
#pragma once
#include <cstdint>
#include <cstring>

#include "airtrace/common.h"
#include "variant.h"

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace airtrace::AIRTRACE_ISA::cpu {

// A bf16 element, so that bf16 rows have their own pointer type.
struct Bf16 {
  uint16_t bits;
};

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1fu) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: renormalise
    exponent = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// dst[i] = float(h[i]) for i < count, h fp16 (hardware conversion where available).
inline void f16_row_to_float(const uint16_t* h, int64_t count, float* dst) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= count; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i))));
#elif defined(__F16C__)
  for (; i + 8 <= count; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
#endif
  for (; i < count; ++i) dst[i] = f16_to_float(h[i]);
}

// dst[i] = float(src[i]) for i < count, src of element type `dtype`.
inline void load_row(const void* src, DType dtype, int64_t count, float* dst) {
  if (dtype == DType::f32) {
    std::memcpy(dst, src, count * sizeof(float));
  } else if (dtype == DType::bf16) {
    const auto* s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < count; ++i) dst[i] = bf16_to_float(s[i]);
  } else {
    f16_row_to_float(static_cast<const uint16_t*>(src), count, dst);
  }
}

inline int64_t element_size(DType dtype) { return dtype == DType::f32 ? 4 : 2; }

// Address of element `index` of an array of `dtype`.
inline const void* element_ptr(const void* base, DType dtype, int64_t index) {
  return static_cast<const char*>(base) + index * element_size(dtype);
}

inline const void* row_ptr(const void* base, DType dtype, int64_t row, int64_t stride) {
  return element_ptr(base, dtype, row * stride);
}

}  // namespace airtrace::AIRTRACE_ISA::cpu
