// bf16 <-> fp32 conversions shared by kiln's CPU kernels, scalar and AVX-512, with torch's rounding.
//
// Why one header: the kernels promise torch's bits (rms_norm vs F.rms_norm, silu_mul vs F.silu * up, rope_kv
// vs the torch RoPE ops, paged attention vs attention._decode_reference, int_gemv vs (q * s).to(bf16)), and
// each of them used to carry its own copy of these few lines; the copies disagreed on NaN (some kept the
// sign and payload, some wrote c10's 0x7FC0), so a NaN came out with different bits depending on the op.
//
// The encoding is torch's CPU one, `tensor.to(torch.bfloat16)` and every vectorised bf16 op (ATen's
// cvtfp32_bf16, AVX2 and AVX-512 alike): round to nearest, ties to even, on the fp32 bits; infinities and
// denormals follow from that formula; every NaN becomes 0xFFFF. (c10::BFloat16(float), torch's scalar
// conversion, writes 0x7FC0 instead; the vectorised ops are what the kernels replace.)
// tests/test_kernel_bf16.py checks both variants against torch on NaN, Inf, denormals and ties.
//
// The AVX-512 functions carry a target attribute, so a file compiled without -mavx512* flags can include
// this header and call them from its own AVX-512 functions (after checking the CPU at run time).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace kiln {

constexpr uint16_t kBf16NaN = 0xFFFF;  // what torch's vectorised fp32 -> bf16 writes for any NaN

inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // nearest even; NaN -> kBf16NaN
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return kBf16NaN;
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

#define KILN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

// 16 bf16 -> 16 fp32 (exact)
KILN_AVX512 inline __m512 widen16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
      reinterpret_cast<const __m256i*>(p))), 16));
}

// the lanes of mask m (the others read as 0.0f)
KILN_AVX512 inline __m512 widen16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// 16 fp32 -> bf16 bits in the low half of each 32-bit lane: float_to_bf16 lane by lane
KILN_AVX512 inline __m512i to_bf16_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  return _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(kBf16NaN));
}

// fp32 rounded to bf16 and back (the value a bf16 op would store, as fp32)
KILN_AVX512 inline __m512 round_bf16(__m512 v) { return _mm512_castsi512_ps(_mm512_slli_epi32(to_bf16_bits(v), 16)); }

}  // namespace kiln
