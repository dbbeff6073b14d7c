// AVX-512 building blocks shared by the CPU kernels: 16 values of fp32, fp16 or bf16 as one vector of floats.
// FASTDIFF_AVX512 is 1 where the compiler targets AVX-512 F/DQ/BW/VL (setup.py adds those flags on a CPU that
// has them), else 0 and nothing below is defined: the kernels then use their portable loops.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// GCC 12 warns about the _mm512_undefined_ps() inside its own intrinsics (GCC bug 105593, fixed in 13), also
// through _mm512_reduce_add_ps
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#define FASTDIFF_AVX512 1
#else
#define FASTDIFF_AVX512 0
#endif

#if FASTDIFF_AVX512
namespace fastdiff {

// The lanes of a 16-float vector that hold values when `left` values remain (0 to 16 of them).
inline __mmask16 lane_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xffff)
                    : left <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << left) - 1u);
}

// 16 values of a float, c10::Half or c10::BFloat16 array as 16 floats (load16) and back (store16): fp16 by the
// F16C conversions, bf16 by a shift (load) and round-to-nearest-even with NaN kept (store: what c10::BFloat16's
// conversion does), so the fp16 and bf16 kernels run the fp32 loops with no scalar conversion. m: the lanes to
// read or write (the others read as 0).
template <typename T>
inline __m512 load16(const T* p, __mmask16 m = 0xffff) {
  if constexpr (std::is_same_v<T, float>) {
    return m == 0xffff ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
  } else {
    const __m256i h = m == 0xffff ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                  : _mm256_maskz_loadu_epi16(m, p);
    if constexpr (std::is_same_v<T, c10::Half>)
      return _mm512_cvtph_ps(h);
    else
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

template <typename T>
inline __m256i to_16bit(__m512 v) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {
#if defined(__AVX512BF16__)
    // vcvtneps2bf16 rounds to nearest even as c10 does, but reads denormals as 0 and keeps NaN payloads: vectors
    // with such lanes (rare) take the integer path below
    if (_mm512_fpclass_ps_mask(v, 0xA1) == 0) return (__m256i)_mm512_cvtneps_pbh(v);  // 0xA1: QNaN, SNaN, denormal
#endif
    const __m512i b = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(r);
  }
}

// Stores the lanes in m. kStream: a full vector at an address aligned to its size (64 bytes fp32, 32 bytes
// fp16/bf16) goes by a non-temporal store (see stream_output); anything else by an ordinary store.
template <bool kStream = false, typename T>
inline void store16(T* p, __m512 v, __mmask16 m = 0xffff) {
  constexpr uintptr_t kBytes = 16 * sizeof(T);
  const bool nt = kStream && m == 0xffff && (reinterpret_cast<uintptr_t>(p) & (kBytes - 1)) == 0;
  if constexpr (std::is_same_v<T, float>) {
    if (nt)
      _mm512_stream_ps(p, v);
    else if (m == 0xffff)
      _mm512_storeu_ps(p, v);
    else
      _mm512_mask_storeu_ps(p, m, v);
  } else {
    const __m256i h = to_16bit<T>(v);
    if (nt)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), h);
    else if (m == 0xffff)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
    else
      _mm256_mask_storeu_epi16(p, m, h);
  }
}

// f(i, m) over n values 16 at a time: full vectors (m = all lanes, a constant the masks fold away), then a tail.
template <typename F>
inline void for_vectors(int64_t n, F&& f) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) f(i, static_cast<__mmask16>(0xffff));
  if (i < n) f(i, lane_mask(n - i));
}

// o[i] = p[i] as float, and back (rounded as torch rounds), n values.
template <typename T>
inline void to_float(const T* p, float* o, int64_t n) {
  for_vectors(n, [&](int64_t i, __mmask16 m) { store16(o + i, load16(p + i, m), m); });
}

template <typename T>
inline void from_float(const float* v, T* p, int64_t n) {
  for_vectors(n, [&](int64_t i, __mmask16 m) { store16(p + i, load16(v + i, m), m); });
}

}  // namespace fastdiff
#endif
