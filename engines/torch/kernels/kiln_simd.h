// The few fp32 vector operations kiln's elementwise kernels need, for the ISA the file is compiled for:
// AVX-512 (-mavx512f -mavx512bw -mavx512vl, 16 lanes) or AVX2 (-mavx2 -mfma -mf16c, 8 lanes).
//
// Why: each kernel source (rms_norm, silu_mul, rope_kv, argmax, token_mask, paged_attention) is compiled once per ISA level under
// its own extension name (isa_variants.py) and written once against these functions, so the AVX-512 and the
// AVX2 builds cannot drift apart. Every function rounds as its AVX-512 instruction does (scale_pow2 = scalef,
// round_bf16 = kiln_bf16.h's rounding), so the two builds give the same bits wherever the kernel's order of
// operations does not depend on the lane count (a horizontal sum does: 16 partial sums vs 8).
#pragma once

#include "kiln_bf16.h"

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace kiln::simd {

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)

constexpr int64_t W = 16;
using F = __m512;

inline __mmask16 first_lanes(int64_t n) {
  return n >= W ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

inline F set1(float v) { return _mm512_set1_ps(v); }
inline F add(F a, F b) { return _mm512_add_ps(a, b); }
inline F sub(F a, F b) { return _mm512_sub_ps(a, b); }
inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }
inline F div(F a, F b) { return _mm512_div_ps(a, b); }
inline F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }    // a * b + c, rounded once
inline F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b, rounded once
inline F min(F a, F b) { return _mm512_min_ps(a, b); }                // b when either is NaN
inline F max(F a, F b) { return _mm512_max_ps(a, b); }                // b when either is NaN
inline F round_nearest(F v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline F scale_pow2(F p, F n) { return _mm512_scalef_ps(p, n); }  // p * 2^n for integral n, rounded once
inline float reduce_add(F v) { return _mm512_reduce_add_ps(v); }
inline float reduce_max(F v) { return _mm512_reduce_max_ps(v); }

inline F load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, F v) { _mm512_storeu_ps(p, v); }
// the first min(n, W) floats; the other lanes read as 0.0f and nothing past them is touched
inline F load_n(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first_lanes(n), p); }
inline void store_n(float* p, F v, int64_t n) { _mm512_mask_storeu_ps(p, first_lanes(n), v); }
inline F keep_first(F v, int64_t n) { return _mm512_maskz_mov_ps(first_lanes(n), v); }  // lanes >= n -> 0.0f
// W int8 codes, exactly
inline F load_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
// W bytes, each replaced by table[byte] (a 256-entry decoding table, e.g. fp8 e4m3)
inline F lookup_u8(const int8_t* p, const float* table) {
  return _mm512_i32gather_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), table, 4);
}
// lane i of the result = the sum of the lanes of v[i], for W vectors (v is overwritten): W horizontal sums in
// log2(W) rounds of pairwise adds (15 adds at 16 lanes) instead of W reductions
inline F transpose_add(F* v) {
  alignas(64) static const int lo1[16] = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  alignas(64) static const int hi1[16] = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  alignas(64) static const int lo2[16] = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  alignas(64) static const int hi2[16] = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
  alignas(64) static const int lo3[16] = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
  alignas(64) static const int hi3[16] = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
  alignas(64) static const int lo4[16] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  alignas(64) static const int hi4[16] = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  const int* lo[4] = {lo1, lo2, lo3, lo4};
  const int* hi[4] = {hi1, hi2, hi3, hi4};
  int n = 16;
  for (int level = 0; level < 4; ++level) {  // n vectors -> n / 2, each pair packed side by side
    const __m512i l = _mm512_load_si512(lo[level]), h = _mm512_load_si512(hi[level]);
    for (int i = 0; i < n / 2; ++i)
      v[i] = _mm512_add_ps(_mm512_permutex2var_ps(v[2 * i], l, v[2 * i + 1]),
                           _mm512_permutex2var_ps(v[2 * i], h, v[2 * i + 1]));
    n /= 2;
  }
  return v[0];
}
// the first min(n, W) bf16 values, exactly; the other lanes read as 0.0f
inline F load_bf16(const uint16_t* p, int64_t n) { return widen16(p, first_lanes(n)); }
// v rounded to bf16 (kiln_bf16.h), the first min(n, W) lanes stored
inline void store_bf16(uint16_t* p, F v, int64_t n) {
  _mm256_mask_storeu_epi16(p, first_lanes(n), _mm512_cvtepi32_epi16(to_bf16_bits(v)));
}
inline F round_bf16(F v) { return kiln::round_bf16(v); }

// one bit per lane, lane 0 lowest
inline uint32_t nan_lanes(F v) { return _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q); }
inline uint32_t equal_lanes(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
// lane i from `set` where bit i of `bits` is 1, else from `clear`
inline F select_bits(uint32_t bits, F clear, F set) {
  return _mm512_mask_blend_ps(static_cast<__mmask16>(bits), clear, set);
}

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

constexpr int64_t W = 8;
using F = __m256;

inline F set1(float v) { return _mm256_set1_ps(v); }
inline F add(F a, F b) { return _mm256_add_ps(a, b); }
inline F sub(F a, F b) { return _mm256_sub_ps(a, b); }
inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }
inline F div(F a, F b) { return _mm256_div_ps(a, b); }
inline F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
inline F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
inline F min(F a, F b) { return _mm256_min_ps(a, b); }
inline F max(F a, F b) { return _mm256_max_ps(a, b); }
inline F round_nearest(F v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

// AVX2 has no scalef: 2^n is built from exponent bits, which reach only 2^-126..2^127, so n (|n| <= 128 for
// exp's clamped range) is split in two halves. p * 2^(n/2) is exact (a normal number), and the second product
// rounds once, as scalef does, also when the result is denormal.
inline F pow2(__m256i k) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23)); }
inline F scale_pow2(F p, F n) {
  const __m256i k = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(k, 1);
  return _mm256_mul_ps(_mm256_mul_ps(p, pow2(half)), pow2(_mm256_sub_epi32(k, half)));
}

inline float reduce_add(F v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float reduce_max(F v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

inline F load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, F v) { _mm256_storeu_ps(p, v); }
// lanes 0..n-1 all ones (n clamped to W): the mask of AVX2's maskload / maskstore, which touch no other lane
inline __m256i first_lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n < W ? n : W)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline F load_n(const float* p, int64_t n) { return n >= W ? load(p) : _mm256_maskload_ps(p, first_lanes(n)); }
inline void store_n(float* p, F v, int64_t n) {
  if (n >= W) store(p, v);
  else _mm256_maskstore_ps(p, first_lanes(n), v);
}
inline F keep_first(F v, int64_t n) { return _mm256_and_ps(v, _mm256_castsi256_ps(first_lanes(n))); }
inline F load_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline F lookup_u8(const int8_t* p, const float* table) {
  return _mm256_i32gather_ps(table, _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))), 4);
}
// hadd pairs neighbours within each 128-bit half: two rounds leave [v0..v3 low-half sums | their high-half sums],
// and one cross-half add finishes 8 sums (7 + 4 + 1 vector ops for 8 reductions)
inline F transpose_add(F* v) {
  const F a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const F b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

inline F widen8(__m128i bf16) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bf16), 16)); }
// AVX2 has no 16-bit masked loads and stores: a tail goes through a zeroed 8-lane buffer
inline F load_bf16(const uint16_t* p, int64_t n) {
  if (n >= W) return widen8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  alignas(16) uint16_t tail[W] = {};
  std::memcpy(tail, p, static_cast<size_t>(n) * sizeof(uint16_t));
  return widen8(_mm_load_si128(reinterpret_cast<const __m128i*>(tail)));
}

// kiln_bf16.h's to_bf16_bits on 8 lanes: nearest even on the fp32 bits, every NaN -> kBf16NaN
inline __m256i to_bf16_bits(F v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(kBf16NaN), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}
inline void store_bf16(uint16_t* p, F v, int64_t n) {
  const __m256i b = to_bf16_bits(v);  // each lane <= 0xFFFF, so the unsigned saturating pack keeps it
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
  if (n >= W) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
    return;
  }
  alignas(16) uint16_t tail[W];
  _mm_store_si128(reinterpret_cast<__m128i*>(tail), packed);
  std::memcpy(p, tail, static_cast<size_t>(n) * sizeof(uint16_t));
}
inline F round_bf16(F v) { return _mm256_castsi256_ps(_mm256_slli_epi32(to_bf16_bits(v), 16)); }

inline uint32_t nan_lanes(F v) { return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q))); }
inline uint32_t equal_lanes(F a, F b) { return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_EQ_OQ))); }
inline F select_bits(uint32_t bits, F clear, F set) {
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i on = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), lane_bit), lane_bit);
  return _mm256_blendv_ps(clear, set, _mm256_castsi256_ps(on));
}

#else
#error "kiln_simd.h needs -mavx512f -mavx512bw -mavx512vl or -mavx2 -mfma -mf16c (isa_variants.py)"
#endif

inline F zero() { return set1(0.0f); }

// Rows of either element type kernels take (uint16_t rows hold bf16 bits), for kernels written once over both:
// load_n / store_n of the first min(n, W) values, and the value a stored intermediate of that type would have.
inline F load_n(const uint16_t* p, int64_t n) { return load_bf16(p, n); }
inline void store_n(uint16_t* p, F v, int64_t n) { store_bf16(p, v, n); }
template <typename T>
inline F round_as(F v) {
  if constexpr (std::is_same_v<T, uint16_t>) return round_bf16(v);
  else return v;
}

// exp(x): the Cephes expf polynomial with range reduction (~1-2 ulp, like torch's Sleef exp), clamped to the
// float range so that silu(x) -> 0 for x -> -inf and x for x -> +inf; a NaN reads as the lower clamp.
inline F exp(F x) {
  x = min(max(x, set1(-88.3762626647949f)), set1(88.3762626647949f));
  const F n = round_nearest(mul(x, set1(1.44269504088896341f)));
  x = fnmadd(n, set1(0.693359375f), x);
  x = fnmadd(n, set1(-2.12194440e-4f), x);
  F p = set1(1.9875691500E-4f);
  p = fmadd(p, x, set1(1.3981999507E-3f));
  p = fmadd(p, x, set1(8.3334519073E-3f));
  p = fmadd(p, x, set1(4.1665795894E-2f));
  p = fmadd(p, x, set1(1.6666665459E-1f));
  p = fmadd(p, x, set1(5.0000001201E-1f));
  p = fmadd(p, mul(x, x), add(x, set1(1.f)));
  return scale_pow2(p, n);
}

}  // namespace kiln::simd
