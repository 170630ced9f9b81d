// Paged decode attention (one query token per sequence) over a block-structured KV cache, in one op.
//   q [B, H, D] (bf16 | fp32), cache [2, KVH, NB, BS, D] (bf16 | fp32 | int8 codes | fp8 e4m3fn bytes
//   viewed as int8), block_tables [B, W] int64, context_lens [B] int64 -> out [B, H, D] in q's dtype.
// Same math as attention.py's _decode_reference, all in fp32: scores = scale * q . k over the first
// context_lens[b] tokens of the sequence, softmax with max subtraction, out = sum p v. A quantized cache
// dequantizes as code * scale per KV head; the key scale is folded into q and the value scale into the
// output, as the reference does.
// Why: the torch path runs ~10 small ops per layer (gather copy, casts, two bmm, mask, softmax), a large
// share of a decode step. Here one task is one (sequence, KV head): its G = H / KVH query heads share
// every key/value row, converted to fp32 once. Tasks are independent, so a sequence's output does not
// depend on the batch it is in, nor on the number of threads.
#include <torch/extension.h>

#include "kiln_bf16.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace {

constexpr int kLanes = 16;  // one zmm of fp32: the dot products keep 16 independent partial sums

using kiln::bf16_to_float;
using kiln::float_to_bf16;

struct Fp8Table {
  float v[256];
  Fp8Table() {
    for (int b = 0; b < 256; ++b) {
      const int e = (b >> 3) & 0xF, m = b & 7;
      float mag = e == 0 ? std::ldexp(static_cast<float>(m), -9)  // subnormal: m/8 * 2^-6
                         : std::ldexp(1.0f + m / 8.0f, e - 7);
      if ((b & 0x7F) == 0x7F) mag = std::numeric_limits<float>::quiet_NaN();
      v[b] = (b & 0x80) ? -mag : mag;
    }
  }
};

const float* fp8_table() {
  static const Fp8Table table;  // built once, thread-safe initialisation
  return table.v;
}

enum CacheKind { kF32 = 0, kBF16 = 1, kInt8 = 2, kFp8 = 3 };

template <int CK, typename CT>
inline void widen_row(const CT* __restrict src, float* __restrict dst, int64_t d, const float* __restrict lut) {
  if constexpr (CK == kF32) {
    for (int64_t i = 0; i < d; ++i) dst[i] = src[i];
  } else if constexpr (CK == kBF16) {
    for (int64_t i = 0; i < d; ++i) {
      uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
      float f;
      std::memcpy(&f, &bits, sizeof f);
      dst[i] = f;
    }
  } else if constexpr (CK == kInt8) {
    for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<float>(src[i]);
  } else {
    for (int64_t i = 0; i < d; ++i) dst[i] = lut[static_cast<uint8_t>(src[i])];
  }
}

inline float dot(const float* __restrict a, const float* __restrict b, int64_t d) {
#ifdef __AVX512F__
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  if (i < d) {
    const __mmask16 m = static_cast<__mmask16>((1u << (d - i)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
#else
  float acc[kLanes] = {0.f};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * b[i + j];
  float s = 0.f;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  for (; i < d; ++i) s += a[i] * b[i];
  return s;
#endif
}

#ifdef __AVX512F__
// exp for x <= 0 (softmax after max subtraction), Cephes expf polynomial: ~1-2 ulp, like torch's Sleef exp
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-88.3762626647949f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(y, n);
}
#endif

// s[0..n) <- softmax(s) in place
inline void softmax_row(float* s, int64_t n) {
#ifdef __AVX512F__
  __m512 mv = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t t = 0;
  for (; t + kLanes <= n; t += kLanes) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + t));
  float m = _mm512_reduce_max_ps(mv);
  for (; t < n; ++t) m = std::max(m, s[t]);
  const __m512 mm = _mm512_set1_ps(m);
  __m512 sv = _mm512_setzero_ps();
  for (t = 0; t < n; t += kLanes) {
    const __mmask16 k = n - t >= kLanes ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - t)) - 1);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + t), mm));
    _mm512_mask_storeu_ps(s + t, k, e);
    sv = _mm512_mask_add_ps(sv, k, sv, e);
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sv));
  for (t = 0; t < n; t += kLanes) {
    const __mmask16 k = n - t >= kLanes ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - t)) - 1);
    _mm512_mask_storeu_ps(s + t, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + t), inv));
  }
#else
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < n; ++t) m = std::max(m, s[t]);
  float sum = 0.f;
  for (int64_t t = 0; t < n; ++t) {
    s[t] = std::exp(s[t] - m);
    sum += s[t];
  }
  const float inv = 1.f / sum;
  for (int64_t t = 0; t < n; ++t) s[t] *= inv;
#endif
}

template <typename QT, int CK, typename CT>
void run_generic(const QT* qp, const CT* cp, const int64_t* bt, const int64_t* lens, QT* op, int64_t B, int64_t H,
         int64_t D, int64_t KVH, int64_t NB, int64_t BS, int64_t W, float scale, const float* ks, const float* vs) {
  const int64_t G = H / KVH;
  const float* lut = CK == kFp8 ? fp8_table() : nullptr;
  const int64_t half = KVH * NB * BS * D;  // offset of the values in the cache
  int64_t work = 0;
  for (int64_t b = 0; b < B; ++b) work += std::min<int64_t>(lens[b], W * BS);
  work *= KVH * D * (G + 1);
  // small steps (batch 1, short context) stay on the calling thread: waking threads costs more
  const int64_t grain = work < (1 << 17) ? B * KVH : 1;
  at::parallel_for(0, B * KVH, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), row(D), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KVH, h = task % KVH;
      const int64_t L = lens[b];
      const int64_t* table = bt + b * W;
      QT* out = op + (b * H + h * G) * D;
      if (L <= 0) {  // nothing to attend to
        for (int64_t i = 0; i < G * D; ++i) out[i] = static_cast<QT>(0.f);
        continue;
      }
      const float kscale = ks ? ks[h] : 1.f, vscale = vs ? vs[h] : 1.f;
      const QT* q = qp + (b * H + h * G) * D;
      for (int64_t i = 0; i < G * D; ++i) {
        float x;
        if constexpr (std::is_same_v<QT, at::BFloat16>) x = bf16_to_float(reinterpret_cast<const uint16_t*>(q)[i]);
        else x = static_cast<float>(q[i]);
        qf[i] = ks ? x * kscale : x;  // q . (k * s) == (q * s) . k
      }
      scores.resize(G * L);
      const CT* kbase = cp + h * NB * BS * D;
      const CT* vbase = kbase + half;
      // pass 1: scores[g][t] = scale * q_g . k_t
      for (int64_t t = 0; t < L; ++t) {
        const int64_t slot = table[t / BS] * BS + t % BS;
        widen_row<CK>(kbase + slot * D, row.data(), D, lut);
        for (int64_t g = 0; g < G; ++g) scores[g * L + t] = dot(qf.data() + g * D, row.data(), D) * scale;
      }
      // pass 2: softmax per query head
      for (int64_t g = 0; g < G; ++g) softmax_row(scores.data() + g * L, L);
      // pass 3: out_g = sum_t p[g][t] v_t
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < L; ++t) {
        const int64_t slot = table[t / BS] * BS + t % BS;
        widen_row<CK>(vbase + slot * D, row.data(), D, lut);
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * L + t];
          float* __restrict a = acc.data() + g * D;
          const float* __restrict r = row.data();
          for (int64_t i = 0; i < D; ++i) a[i] += p * r[i];
        }
      }
      for (int64_t i = 0; i < G * D; ++i) {
        const float y = vs ? acc[i] * vscale : acc[i];
        if constexpr (std::is_same_v<QT, at::BFloat16>) reinterpret_cast<uint16_t*>(out)[i] = float_to_bf16(y);
        else out[i] = y;
      }
    }
  });
}


#ifdef __AVX512F__
// --- Fast path for head_dim 64 and 128: the 16 tokens of a group
// are scored together and their 16 dot products reduced by one transpose-and-add tree (15 adds) instead
// of 16 horizontal reductions; rows are widened to fp32 with vector conversions. Same fp32 math as
// above, summed in a different order (within the tests' few-ulp tolerance).

// Blocks sit anywhere in the pool, so the hardware prefetcher loses the stream at every block edge
// (shuffled block tables ran well below contiguous ones): rows are fetched 16 tokens ahead.
inline void prefetch_row(const void* row, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(static_cast<const char*>(row) + b, _MM_HINT_T0);
}

template <int CK, typename CT>
inline void widen_vec(const CT* __restrict src, float* __restrict dst, int64_t d, const float* __restrict lut) {
  for (int64_t i = 0; i < d; i += kLanes) {
    __m512 v;
    if constexpr (CK == kF32) {
      v = _mm512_loadu_ps(reinterpret_cast<const float*>(src) + i);
    } else if constexpr (CK == kBF16) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
      v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else if constexpr (CK == kInt8) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    } else {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      v = _mm512_i32gather_ps(_mm512_cvtepu8_epi32(b), lut, 4);
    }
    _mm512_storeu_ps(dst + i, v);
  }
}

// lane t of the result = sum of the 16 lanes of v[t]
inline __m512 sum16x16(__m512* v) {
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

// C = head_dim / 16 is a template argument so that a row and the per-head accumulators live in registers.
template <int C, typename QT, int CK, typename CT>
void run_fast(const QT* qp, const CT* cp, const int64_t* bt, const int64_t* lens, QT* op, int64_t B, int64_t H,
              int64_t KVH, int64_t NB, int64_t BS, int64_t W, float scale, const float* ks, const float* vs) {
  constexpr int64_t D = C * kLanes;
  const int64_t G = H / KVH;
  const float* lut = CK == kFp8 ? fp8_table() : nullptr;
  const int64_t half = KVH * NB * BS * D;
  int64_t work = 0;
  for (int64_t b = 0; b < B; ++b) work += std::min<int64_t>(lens[b], W * BS);
  work *= KVH * D * (G + 1);
  const int64_t grain = work < (1 << 17) ? B * KVH : 1;
  at::parallel_for(0, B * KVH, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), rows, scores;
    std::vector<int64_t> slots;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KVH, h = task % KVH;
      const int64_t L = lens[b];
      const int64_t* table = bt + b * W;
      QT* out = op + (b * H + h * G) * D;
      if (L <= 0) {
        for (int64_t i = 0; i < G * D; ++i) out[i] = static_cast<QT>(0.f);
        continue;
      }
      const float kscale = ks ? ks[h] : 1.f, vscale = vs ? vs[h] : 1.f;
      const QT* q = qp + (b * H + h * G) * D;
      for (int64_t i = 0; i < G * D; ++i) {
        float x;
        if constexpr (std::is_same_v<QT, at::BFloat16>) x = bf16_to_float(reinterpret_cast<const uint16_t*>(q)[i]);
        else x = static_cast<float>(q[i]);
        qf[i] = ks ? x * kscale : x;
      }
      const int64_t Lp = (L + kLanes - 1) / kLanes * kLanes;  // rows padded to whole groups of 16 tokens
      scores.resize(G * Lp);
      rows.resize(Lp * D);
      // token -> cache slot, once per task and without a division per token (64-bit div: ~20+ cycles)
      slots.resize(L);
      for (int64_t t = 0, blk = 0; t < L; ++blk)
        for (int64_t off = 0, base = table[blk] * BS; off < BS && t < L; ++off, ++t) slots[t] = base + off;
      const CT* kbase = cp + h * NB * BS * D;
      const CT* vbase = kbase + half;
      // pass 1: keys widened once to fp32, then per query head 16 tokens at a time
      for (int64_t t = 0; t < L; ++t) {
        if (t + kLanes < L) prefetch_row(kbase + slots[t + kLanes] * D, D * sizeof(CT));
        widen_vec<CK>(kbase + slots[t] * D, rows.data() + t * D, D, lut);
      }
      std::fill(rows.begin() + L * D, rows.end(), 0.f);
      const __m512 vscale_q = _mm512_set1_ps(scale);
      for (int64_t g = 0; g < G; ++g) {
        __m512 qv[C];
        for (int c = 0; c < C; ++c) qv[c] = _mm512_loadu_ps(qf.data() + g * D + c * kLanes);
        for (int64_t t0 = 0; t0 < L; t0 += kLanes) {
          __m512 part[kLanes];
          for (int i = 0; i < kLanes; ++i) {
            const float* r = rows.data() + (t0 + i) * D;
            __m512 a = _mm512_mul_ps(qv[0], _mm512_loadu_ps(r));
            for (int c = 1; c < C; ++c) a = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(r + c * kLanes), a);
            part[i] = a;
          }
          _mm512_storeu_ps(scores.data() + g * Lp + t0, _mm512_mul_ps(sum16x16(part), vscale_q));
        }
        softmax_row(scores.data() + g * Lp, L);
      }
      // pass 3: values widened once, then out_g = sum_t p[g][t] v_t with the accumulators in registers
      for (int64_t t = 0; t < L; ++t) {
        if (t + kLanes < L) prefetch_row(vbase + slots[t + kLanes] * D, D * sizeof(CT));
        widen_vec<CK>(vbase + slots[t] * D, rows.data() + t * D, D, lut);
      }
      for (int64_t g = 0; g < G; ++g) {
        __m512 acc[C];
        for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
        const float* p = scores.data() + g * Lp;
        for (int64_t t = 0; t < L; ++t) {
          const __m512 pt = _mm512_set1_ps(p[t]);
          const float* r = rows.data() + t * D;
          for (int c = 0; c < C; ++c) acc[c] = _mm512_fmadd_ps(pt, _mm512_loadu_ps(r + c * kLanes), acc[c]);
        }
        float y[D];
        for (int c = 0; c < C; ++c)
          _mm512_storeu_ps(y + c * kLanes, vs ? _mm512_mul_ps(acc[c], _mm512_set1_ps(vscale)) : acc[c]);
        QT* o = out + g * D;
        for (int64_t i = 0; i < D; ++i) {
          if constexpr (std::is_same_v<QT, at::BFloat16>) reinterpret_cast<uint16_t*>(o)[i] = float_to_bf16(y[i]);
          else o[i] = y[i];
        }
      }
    }
  });
}

// --- bf16 queries over a bf16 cache (the default model-dtype cache), head_dim 64 or 128, on CPUs with
// AVX512-BF16: keys are scored straight from the cache rows with vdpbf16ps (bf16 x bf16 products are exact
// in fp32 and summed in fp32) and values are widened in registers, so no fp32 copy of the context is made.
// The fast path above writes and re-reads one (2x the cache bytes, as fp32); this one reads each row
// once. Still fp32 math rounded once, in another summation order.
// One block of BS rows is contiguous in the cache, so a group of 16 tokens is usually one 2 KB run.
constexpr int kMaxHeadGroup = 16;  // fp32 accumulators one value pass keeps in registers (heads x D/16)

// the next 16 rows (see prefetch_row), fetched while these are scored
template <int64_t D>
inline void prefetch_rows(const uint16_t* const* rows, int64_t offset) {
  for (int i = 0; i < kLanes; ++i) prefetch_row(rows[i] + offset, D * 2);
}

template <int C2>  // C2 = head_dim / 32: bf16 pairs per row in zmm registers
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void scores_bf16(
    const uint16_t* q, const uint16_t* const* rows, int64_t Lp, int64_t G, float scale, float* scores,
    int64_t stride) {
  constexpr int64_t D = C2 * 32;
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t t0 = 0; t0 < Lp; t0 += kLanes) {
    if (t0 + kLanes < Lp) prefetch_rows<D>(rows + t0 + kLanes, 0);
    for (int64_t g = 0; g < G; ++g) {  // the 16 rows stay in L1 across the G heads
      __m512bh qv[C2];
      for (int c = 0; c < C2; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(q + g * D + c * 32);
      __m512 part[kLanes];
      for (int i = 0; i < kLanes; ++i) {
        const uint16_t* r = rows[t0 + i];
        __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[0], (__m512bh)_mm512_loadu_si512(r));
        for (int c = 1; c < C2; ++c) a = _mm512_dpbf16_ps(a, qv[c], (__m512bh)_mm512_loadu_si512(r + c * 32));
        part[i] = a;
      }
      _mm512_storeu_ps(scores + g * stride + t0, _mm512_mul_ps(sum16x16(part), vscale));
    }
  }
}

template <int C, int N>  // C = head_dim / 16; N heads at once, each with C fp32 accumulators
__attribute__((target("avx512f,avx512bw"))) void values_bf16(
    const uint16_t* const* rows, int64_t half, int64_t L, const float* p, int64_t stride, uint16_t* out) {
  constexpr int64_t D = C * kLanes;
  __m512 acc[N][C];
  for (int j = 0; j < N; ++j)
    for (int c = 0; c < C; ++c) acc[j][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < L; ++t) {
    if (t % kLanes == 0 && t + kLanes < L) prefetch_rows<D>(rows + t + kLanes, half);
    const uint16_t* r = rows[t] + half;
    __m512 v[C];
    for (int c = 0; c < C; ++c) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + c * kLanes));
      v[c] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    for (int j = 0; j < N; ++j) {
      const __m512 pt = _mm512_set1_ps(p[j * stride + t]);
      for (int c = 0; c < C; ++c) acc[j][c] = _mm512_fmadd_ps(pt, v[c], acc[j][c]);
    }
  }
  for (int j = 0; j < N; ++j) {
    float y[D];
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(y + c * kLanes, acc[j][c]);
    for (int64_t i = 0; i < D; ++i) out[j * D + i] = float_to_bf16(y[i]);
  }
}

template <int C>
void values_bf16_heads(const uint16_t* const* rows, int64_t half, int64_t L, const float* p, int64_t stride,
                       int64_t G, uint16_t* out) {
  constexpr int kMaxN = kMaxHeadGroup / C;
  for (int64_t g0 = 0; g0 < G; g0 += kMaxN) {
    const int64_t n = std::min<int64_t>(kMaxN, G - g0);
    const float* pg = p + g0 * stride;
    uint16_t* og = out + g0 * C * kLanes;
    switch (n) {
      case 1: values_bf16<C, 1>(rows, half, L, pg, stride, og); break;
      case 2: values_bf16<C, 2>(rows, half, L, pg, stride, og); break;
      case 3: if constexpr (kMaxN >= 3) values_bf16<C, 3>(rows, half, L, pg, stride, og); break;
      default: if constexpr (kMaxN >= 4) values_bf16<C, 4>(rows, half, L, pg, stride, og); break;
    }
  }
}

bool avx512_bf16_ok() {
  static const bool ok = __builtin_cpu_supports("avx512bf16");
  return ok;
}

template <int C2>
void run_bf16(const uint16_t* qp, const uint16_t* cp, const int64_t* bt, const int64_t* lens, uint16_t* op,
              int64_t B, int64_t H, int64_t KVH, int64_t NB, int64_t BS, int64_t W, float scale) {
  constexpr int64_t D = C2 * 32;
  const int64_t G = H / KVH;
  const int64_t half = KVH * NB * BS * D;
  alignas(64) static const uint16_t zero_row[D] = {};  // keys of the padding tokens in the last group of 16
  int64_t work = 0;
  for (int64_t b = 0; b < B; ++b) work += std::min<int64_t>(lens[b], W * BS);
  work *= KVH * D * (G + 1);
  const int64_t grain = work < (1 << 17) ? B * KVH : 1;
  at::parallel_for(0, B * KVH, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<const uint16_t*> rows;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KVH, h = task % KVH;
      const int64_t L = lens[b];
      const int64_t* table = bt + b * W;
      uint16_t* out = op + (b * H + h * G) * D;
      if (L <= 0) {
        std::fill(out, out + G * D, static_cast<uint16_t>(0));
        continue;
      }
      const int64_t Lp = (L + kLanes - 1) / kLanes * kLanes;
      const uint16_t* kbase = cp + h * NB * BS * D;
      rows.resize(Lp);
      for (int64_t t = 0, blk = 0; t < L; ++blk) {
        const uint16_t* block = kbase + table[blk] * BS * D;
        for (int64_t off = 0; off < BS && t < L; ++off, ++t) rows[t] = block + off * D;
      }
      std::fill(rows.begin() + L, rows.end(), zero_row);
      scores.resize(G * Lp);
      scores_bf16<C2>(qp + (b * H + h * G) * D, rows.data(), Lp, G, scale, scores.data(), Lp);
      for (int64_t g = 0; g < G; ++g) softmax_row(scores.data() + g * Lp, L);
      values_bf16_heads<C2 * 2>(rows.data(), half, L, scores.data(), Lp, G, out);
    }
  });
}
#endif


template <typename QT, int CK, typename CT>
void run(const QT* qp, const CT* cp, const int64_t* bt, const int64_t* lens, QT* op, int64_t B, int64_t H,
         int64_t D, int64_t KVH, int64_t NB, int64_t BS, int64_t W, float scale, const float* ks, const float* vs) {
#ifdef __AVX512F__
  if constexpr (std::is_same_v<QT, at::BFloat16> && CK == kBF16) {
    if ((D == 64 || D == 128) && avx512_bf16_ok()) {
      const auto* q16 = reinterpret_cast<const uint16_t*>(qp);
      auto* o16 = reinterpret_cast<uint16_t*>(op);
      if (D == 64) return run_bf16<2>(q16, cp, bt, lens, o16, B, H, KVH, NB, BS, W, scale);
      return run_bf16<4>(q16, cp, bt, lens, o16, B, H, KVH, NB, BS, W, scale);
    }
  }
  switch (D) {  // the usual head sizes
    case 64: return run_fast<4, QT, CK, CT>(qp, cp, bt, lens, op, B, H, KVH, NB, BS, W, scale, ks, vs);
    case 128: return run_fast<8, QT, CK, CT>(qp, cp, bt, lens, op, B, H, KVH, NB, BS, W, scale, ks, vs);
    default: break;
  }
#endif
  run_generic<QT, CK, CT>(qp, cp, bt, lens, op, B, H, D, KVH, NB, BS, W, scale, ks, vs);
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor cache, torch::Tensor block_tables,
                               torch::Tensor context_lens, double scale, c10::optional<torch::Tensor> k_scale,
                               c10::optional<torch::Tensor> v_scale, std::string kind) {
  TORCH_CHECK(q.device().is_cpu() && cache.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && cache.dim() == 5 && cache.size(0) == 2, "q [B, H, D], cache [2, KVH, NB, BS, D]");
  TORCH_CHECK(q.is_contiguous() && cache.is_contiguous(), "q and cache must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KVH = cache.size(1), NB = cache.size(2), BS = cache.size(3);
  TORCH_CHECK(cache.size(4) == D && H % KVH == 0, "head_dim mismatch or heads not a multiple of kv_heads");
  auto bt = block_tables.to(torch::kInt64).contiguous();
  auto lens = context_lens.to(torch::kInt64).contiguous();
  TORCH_CHECK(bt.dim() == 2 && bt.size(0) == B && lens.numel() == B, "block_tables [B, W], context_lens [B]");
  const int64_t W = bt.size(1);
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t* bp = bt.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] <= W * BS, "context length exceeds the block table");
    const int64_t used = (lp[b] + BS - 1) / BS;
    for (int64_t i = 0; i < used; ++i) TORCH_CHECK(bp[b * W + i] >= 0 && bp[b * W + i] < NB, "block id out of range");
  }
  const bool quant = kind == "int8" || kind == "fp8";
  TORCH_CHECK(quant || kind == "model", "kind must be model, int8 or fp8");
  torch::Tensor ks, vs;
  if (quant) {
    TORCH_CHECK(cache.scalar_type() == torch::kInt8, "a quantized cache is passed as int8 codes");
    TORCH_CHECK(k_scale.has_value() && v_scale.has_value(), "a quantized cache needs k_scale and v_scale");
    ks = k_scale->to(torch::kFloat32).contiguous();
    vs = v_scale->to(torch::kFloat32).contiguous();
    TORCH_CHECK(ks.numel() == KVH && vs.numel() == KVH, "one scale per KV head");
  }
  const float* kp = quant ? ks.data_ptr<float>() : nullptr;
  const float* vp = quant ? vs.data_ptr<float>() : nullptr;
  auto out = torch::empty_like(q);
  const float fs = static_cast<float>(scale);

  auto dispatch = [&](auto tag) {
    using QT = decltype(tag);
    const QT* qp = q.data_ptr<QT>();
    QT* opp = out.data_ptr<QT>();
    const auto ct = cache.scalar_type();
    if (quant) {
      const int8_t* cp = cache.data_ptr<int8_t>();
      if (kind == "int8") run<QT, kInt8>(qp, cp, bp, lp, opp, B, H, D, KVH, NB, BS, W, fs, kp, vp);
      else run<QT, kFp8>(qp, cp, bp, lp, opp, B, H, D, KVH, NB, BS, W, fs, kp, vp);
    } else if (ct == torch::kFloat32) {
      run<QT, kF32>(qp, cache.data_ptr<float>(), bp, lp, opp, B, H, D, KVH, NB, BS, W, fs, kp, vp);
    } else if (ct == torch::kBFloat16) {
      const auto* cp = reinterpret_cast<const uint16_t*>(cache.data_ptr<at::BFloat16>());
      run<QT, kBF16>(qp, cp, bp, lp, opp, B, H, D, KVH, NB, BS, W, fs, kp, vp);
    } else {
      TORCH_CHECK(false, "cache dtype must be bf16, fp32 or int8");
    }
  };
  if (q.scalar_type() == torch::kFloat32) {
    dispatch(float{});
  } else {
    TORCH_CHECK(q.scalar_type() == torch::kBFloat16, "q must be bf16 or fp32");
    dispatch(at::BFloat16{});
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "paged decode attention, one query token per sequence",
        py::arg("q"), py::arg("cache"), py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"),
        py::arg("k_scale"), py::arg("v_scale"), py::arg("kind"), py::call_guard<py::gil_scoped_release>());
}
