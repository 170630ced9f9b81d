// Paged decode attention (one query token per sequence) over a block-structured KV cache, in one op.
//   q [B, H, D] (bf16 | fp32), cache [2, KVH, NB, BS, D] (bf16 | fp32 | int8 codes | fp8 e4m3fn bytes
//   viewed as int8), block_tables [B, TW] int64, context_lens [B] int64 -> out [B, H, D] in q's dtype.
// Same math as attention.py's _decode_reference, all in fp32: scores = scale * q . k over the first
// context_lens[b] tokens of the sequence (its last `window` of them when window > 0: a sliding-window layer),
// softmax with max subtraction, out = sum p v. A quantized cache
// dequantizes as code * scale per KV head; the key scale is folded into q and the value scale into the
// output, as the reference does.
// Why: the torch path runs ~10 small ops per layer (gather copy, casts, two bmm, mask, softmax), a large
// share of a decode step. Here one task is one (sequence, KV head): its G = H / KVH query heads share
// every key/value row, converted to fp32 once. Tasks are independent, so a sequence's output does not
// depend on the batch it is in, nor on the number of threads.
// One source for every ISA level: kiln_simd.h (W = 16 fp32 lanes with AVX-512, 8 with AVX2), compiled per level
// by isa_variants.py. The AVX-512 build adds the AVX512-BF16 path for bf16 caches, taken where the caller says
// the CPU has it (paged_attention.py asks extension.cpu_flags(), so KILN_CPU_ISA turns it off too).
#include "kiln_torch.h"

#include "kiln_bf16.h"
#include "kiln_simd.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace {

namespace simd = kiln::simd;
using simd::F;
using simd::W;  // fp32 lanes of one vector: the dot products keep W independent partial sums

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
  F acc = simd::zero();
  for (int64_t i = 0; i < d; i += W) acc = simd::fmadd(simd::load_n(a + i, d - i), simd::load_n(b + i, d - i), acc);
  return simd::reduce_add(acc);
}

// s[0..n) <- softmax(s) in place (after max subtraction every exp argument is <= 0, inside exp's clamps)
inline void softmax_row(float* s, int64_t n) {
  F mv = simd::set1(-std::numeric_limits<float>::infinity());
  int64_t t = 0;
  for (; t + W <= n; t += W) mv = simd::max(mv, simd::load(s + t));
  float m = simd::reduce_max(mv);
  for (; t < n; ++t) m = std::max(m, s[t]);
  const F mm = simd::set1(m);
  F sv = simd::zero();
  for (t = 0; t < n; t += W) {
    const F e = simd::keep_first(simd::exp(simd::sub(simd::load_n(s + t, n - t), mm)), n - t);
    simd::store_n(s + t, e, n - t);
    sv = simd::add(sv, e);
  }
  const F inv = simd::set1(1.f / simd::reduce_add(sv));
  for (t = 0; t < n; t += W) simd::store_n(s + t, simd::mul(simd::load_n(s + t, n - t), inv), n - t);
}

// The first key a sliding-window layer's query (at position len - 1) sees: transformers' rule, key > query - window.
// Keys before it are skipped, not masked (the cache still holds them). window <= 0: the whole context.
inline int64_t first_key(int64_t len, int64_t window) { return window > 0 && len > window ? len - window : 0; }

template <typename QT, int CK, typename CT>
void run_generic(const QT* qp, const CT* cp, const int64_t* bt, const int64_t* lens, QT* op, int64_t B, int64_t H,
         int64_t D, int64_t KVH, int64_t NB, int64_t BS, int64_t TW, float scale, int64_t window, const float* ks,
         const float* vs) {
  const int64_t G = H / KVH;
  const float* lut = CK == kFp8 ? fp8_table() : nullptr;
  const int64_t half = KVH * NB * BS * D;  // offset of the values in the cache
  int64_t work = 0;
  for (int64_t b = 0; b < B; ++b) work += std::min<int64_t>(lens[b] - first_key(lens[b], window), TW * BS);
  work *= KVH * D * (G + 1);
  // small steps (batch 1, short context) stay on the calling thread: waking threads costs more
  const int64_t grain = work < (1 << 17) ? B * KVH : 1;
  at::parallel_for(0, B * KVH, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), row(D), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KVH, h = task % KVH;
      const int64_t S = first_key(lens[b], window), L = lens[b] - S;  // tokens S .. S + L - 1 are attended
      const int64_t* table = bt + b * TW;
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
        const int64_t slot = table[(S + t) / BS] * BS + (S + t) % BS;
        widen_row<CK>(kbase + slot * D, row.data(), D, lut);
        for (int64_t g = 0; g < G; ++g) scores[g * L + t] = dot(qf.data() + g * D, row.data(), D) * scale;
      }
      // pass 2: softmax per query head
      for (int64_t g = 0; g < G; ++g) softmax_row(scores.data() + g * L, L);
      // pass 3: out_g = sum_t p[g][t] v_t
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < L; ++t) {
        const int64_t slot = table[(S + t) / BS] * BS + (S + t) % BS;
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


// --- Fast path for head_dim 64 and 128: the W tokens of a group are scored together and their W dot products
// reduced by one transpose-and-add tree (simd::transpose_add) instead of W horizontal reductions; rows are
// widened to fp32 with vector conversions. Same fp32 math as above, summed in a different order (within the
// tests' few-ulp tolerance).

// Blocks sit anywhere in the pool, so the hardware prefetcher loses the stream at every block edge
// (shuffled block tables ran well below contiguous ones): rows are fetched W tokens ahead.
inline void prefetch_row(const void* row, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(static_cast<const char*>(row) + b, _MM_HINT_T0);
}

template <int CK, typename CT>
inline void widen_vec(const CT* __restrict src, float* __restrict dst, int64_t d, const float* __restrict lut) {
  for (int64_t i = 0; i < d; i += W) {
    F v;
    if constexpr (CK == kF32) v = simd::load(reinterpret_cast<const float*>(src) + i);
    else if constexpr (CK == kBF16) v = simd::load_bf16(src + i, W);
    else if constexpr (CK == kInt8) v = simd::load_i8(src + i);
    else v = simd::lookup_u8(src + i, lut);
    simd::store(dst + i, v);
  }
}

// C = head_dim / W is a template argument so that a row and the per-head accumulators live in registers.
template <int C, typename QT, int CK, typename CT>
void run_fast(const QT* qp, const CT* cp, const int64_t* bt, const int64_t* lens, QT* op, int64_t B, int64_t H,
              int64_t KVH, int64_t NB, int64_t BS, int64_t TW, float scale, int64_t window, const float* ks,
              const float* vs) {
  constexpr int64_t D = C * W;
  const int64_t G = H / KVH;
  const float* lut = CK == kFp8 ? fp8_table() : nullptr;
  const int64_t half = KVH * NB * BS * D;
  int64_t work = 0;
  for (int64_t b = 0; b < B; ++b) work += std::min<int64_t>(lens[b] - first_key(lens[b], window), TW * BS);
  work *= KVH * D * (G + 1);
  const int64_t grain = work < (1 << 17) ? B * KVH : 1;
  at::parallel_for(0, B * KVH, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), rows, scores;
    std::vector<int64_t> slots;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KVH, h = task % KVH;
      const int64_t S = first_key(lens[b], window), L = lens[b] - S;  // tokens S .. S + L - 1 are attended
      const int64_t* table = bt + b * TW;
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
      const int64_t Lp = (L + W - 1) / W * W;  // rows padded to whole groups of W tokens
      scores.resize(G * Lp);
      rows.resize(Lp * D);
      // token -> cache slot, once per task and without a division per token (64-bit div: ~20+ cycles)
      slots.resize(L);
      for (int64_t t = 0, blk = S / BS, off = S % BS; t < L; ++blk, off = 0)
        for (const int64_t base = table[blk] * BS; off < BS && t < L; ++off, ++t) slots[t] = base + off;
      const CT* kbase = cp + h * NB * BS * D;
      const CT* vbase = kbase + half;
      // pass 1: keys widened once to fp32, then per query head 16 tokens at a time
      for (int64_t t = 0; t < L; ++t) {
        if (t + W < L) prefetch_row(kbase + slots[t + W] * D, D * sizeof(CT));
        widen_vec<CK>(kbase + slots[t] * D, rows.data() + t * D, D, lut);
      }
      std::fill(rows.begin() + L * D, rows.end(), 0.f);
      const F vscale_q = simd::set1(scale);
      for (int64_t g = 0; g < G; ++g) {
        F qv[C];
        for (int c = 0; c < C; ++c) qv[c] = simd::load(qf.data() + g * D + c * W);
        for (int64_t t0 = 0; t0 < L; t0 += W) {
          F part[W];
          for (int i = 0; i < W; ++i) {
            const float* r = rows.data() + (t0 + i) * D;
            F a = simd::mul(qv[0], simd::load(r));
            for (int c = 1; c < C; ++c) a = simd::fmadd(qv[c], simd::load(r + c * W), a);
            part[i] = a;
          }
          simd::store(scores.data() + g * Lp + t0, simd::mul(simd::transpose_add(part), vscale_q));
        }
        softmax_row(scores.data() + g * Lp, L);
      }
      // pass 3: values widened once, then out_g = sum_t p[g][t] v_t with the accumulators in registers
      for (int64_t t = 0; t < L; ++t) {
        if (t + W < L) prefetch_row(vbase + slots[t + W] * D, D * sizeof(CT));
        widen_vec<CK>(vbase + slots[t] * D, rows.data() + t * D, D, lut);
      }
      for (int64_t g = 0; g < G; ++g) {
        F acc[C];
        for (int c = 0; c < C; ++c) acc[c] = simd::zero();
        const float* p = scores.data() + g * Lp;
        for (int64_t t = 0; t < L; ++t) {
          const F pt = simd::set1(p[t]);
          const float* r = rows.data() + t * D;
          for (int c = 0; c < C; ++c) acc[c] = simd::fmadd(pt, simd::load(r + c * W), acc[c]);
        }
        float y[D];
        for (int c = 0; c < C; ++c) simd::store(y + c * W, vs ? simd::mul(acc[c], simd::set1(vscale)) : acc[c]);
        QT* o = out + g * D;
        for (int64_t i = 0; i < D; ++i) {
          if constexpr (std::is_same_v<QT, at::BFloat16>) reinterpret_cast<uint16_t*>(o)[i] = float_to_bf16(y[i]);
          else o[i] = y[i];
        }
      }
    }
  });
}

#ifdef __AVX512F__
static_assert(W == 16, "the AVX512-BF16 path works on 16-lane vectors");

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
  for (int i = 0; i < W; ++i) prefetch_row(rows[i] + offset, D * 2);
}

template <int C2>  // C2 = head_dim / 32: bf16 pairs per row in zmm registers
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void scores_bf16(
    const uint16_t* q, const uint16_t* const* rows, int64_t Lp, int64_t G, float scale, float* scores,
    int64_t stride, int64_t vhalf) {
  constexpr int64_t D = C2 * 32;
  const __m512 vscale = _mm512_set1_ps(scale);
  // keys two groups of 16 rows ahead (the first two at once), and each group's value rows while its keys are scored,
  // so the value pass finds them in cache: 5% off the 30 layers of a 32-sequence step, with the block tables of a
  // busy pool (docs/performance.md)
  for (int64_t t0 = 0; t0 < std::min<int64_t>(Lp, 2 * W); t0 += W) prefetch_rows<D>(rows + t0, 0);
  for (int64_t t0 = 0; t0 < Lp; t0 += W) {
    if (t0 + 2 * W < Lp) prefetch_rows<D>(rows + t0 + 2 * W, 0);
    prefetch_rows<D>(rows + t0, vhalf);
    for (int64_t g = 0; g < G; ++g) {  // the 16 rows stay in L1 across the G heads
      __m512bh qv[C2];
      for (int c = 0; c < C2; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(q + g * D + c * 32);
      __m512 part[W];
      for (int i = 0; i < W; ++i) {
        const uint16_t* r = rows[t0 + i];
        __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[0], (__m512bh)_mm512_loadu_si512(r));
        for (int c = 1; c < C2; ++c) a = _mm512_dpbf16_ps(a, qv[c], (__m512bh)_mm512_loadu_si512(r + c * 32));
        part[i] = a;
      }
      _mm512_storeu_ps(scores + g * stride + t0, _mm512_mul_ps(simd::transpose_add(part), vscale));
    }
  }
}

template <int C, int N>  // C = head_dim / 16; N heads at once, each with C fp32 accumulators
__attribute__((target("avx512f,avx512bw"))) void values_bf16(
    const uint16_t* const* rows, int64_t half, int64_t L, const float* p, int64_t stride, uint16_t* out) {
  constexpr int64_t D = C * W;
  __m512 acc[N][C];
  for (int j = 0; j < N; ++j)
    for (int c = 0; c < C; ++c) acc[j][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < L; ++t) {
    if (t % W == 0 && t + W < L) prefetch_rows<D>(rows + t + W, half);
    const uint16_t* r = rows[t] + half;
    __m512 v[C];
    for (int c = 0; c < C; ++c) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + c * W));
      v[c] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    for (int j = 0; j < N; ++j) {
      const __m512 pt = _mm512_set1_ps(p[j * stride + t]);
      for (int c = 0; c < C; ++c) acc[j][c] = _mm512_fmadd_ps(pt, v[c], acc[j][c]);
    }
  }
  for (int j = 0; j < N; ++j) {
    float y[D];
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(y + c * W, acc[j][c]);
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
    uint16_t* og = out + g0 * C * W;
    switch (n) {
      case 1: values_bf16<C, 1>(rows, half, L, pg, stride, og); break;
      case 2: values_bf16<C, 2>(rows, half, L, pg, stride, og); break;
      case 3: if constexpr (kMaxN >= 3) values_bf16<C, 3>(rows, half, L, pg, stride, og); break;
      default: if constexpr (kMaxN >= 4) values_bf16<C, 4>(rows, half, L, pg, stride, og); break;
    }
  }
}

template <int C2>
void run_bf16(const uint16_t* qp, const uint16_t* cp, const int64_t* bt, const int64_t* lens, uint16_t* op,
              int64_t B, int64_t H, int64_t KVH, int64_t NB, int64_t BS, int64_t TW, float scale, int64_t window) {
  constexpr int64_t D = C2 * 32;
  const int64_t G = H / KVH;
  const int64_t half = KVH * NB * BS * D;
  alignas(64) static const uint16_t zero_row[D] = {};  // keys of the padding tokens in the last group of 16
  int64_t work = 0;
  for (int64_t b = 0; b < B; ++b) work += std::min<int64_t>(lens[b] - first_key(lens[b], window), TW * BS);
  work *= KVH * D * (G + 1);
  const int64_t grain = work < (1 << 17) ? B * KVH : 1;
  at::parallel_for(0, B * KVH, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<const uint16_t*> rows;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KVH, h = task % KVH;
      const int64_t S = first_key(lens[b], window), L = lens[b] - S;  // tokens S .. S + L - 1 are attended
      const int64_t* table = bt + b * TW;
      uint16_t* out = op + (b * H + h * G) * D;
      if (L <= 0) {
        std::fill(out, out + G * D, static_cast<uint16_t>(0));
        continue;
      }
      const int64_t Lp = (L + W - 1) / W * W;
      const uint16_t* kbase = cp + h * NB * BS * D;
      rows.resize(Lp);
      for (int64_t t = 0, blk = S / BS, off = S % BS; t < L; ++blk, off = 0) {
        const uint16_t* block = kbase + table[blk] * BS * D;
        for (; off < BS && t < L; ++off, ++t) rows[t] = block + off * D;
      }
      std::fill(rows.begin() + L, rows.end(), zero_row);
      scores.resize(G * Lp);
      scores_bf16<C2>(qp + (b * H + h * G) * D, rows.data(), Lp, G, scale, scores.data(), Lp, half);
      for (int64_t g = 0; g < G; ++g) softmax_row(scores.data() + g * Lp, L);
      values_bf16_heads<C2 * 2>(rows.data(), half, L, scores.data(), Lp, G, out);
    }
  });
}
#endif


// bf16_dot: the CPU has AVX512-BF16 (ignored by the AVX2 build, which has no such path)
template <typename QT, int CK, typename CT>
void run(const QT* qp, const CT* cp, const int64_t* bt, const int64_t* lens, QT* op, int64_t B, int64_t H,
         int64_t D, int64_t KVH, int64_t NB, int64_t BS, int64_t TW, float scale, int64_t window, const float* ks,
         const float* vs, bool bf16_dot) {
#ifdef __AVX512F__
  if constexpr (std::is_same_v<QT, at::BFloat16> && CK == kBF16) {
    if ((D == 64 || D == 128) && bf16_dot) {
      const auto* q16 = reinterpret_cast<const uint16_t*>(qp);
      auto* o16 = reinterpret_cast<uint16_t*>(op);
      if (D == 64) return run_bf16<2>(q16, cp, bt, lens, o16, B, H, KVH, NB, BS, TW, scale, window);
      return run_bf16<4>(q16, cp, bt, lens, o16, B, H, KVH, NB, BS, TW, scale, window);
    }
  }
#else
  (void)bf16_dot;
#endif
  switch (D) {  // the usual head sizes
    case 64:
      return run_fast<64 / simd::W, QT, CK, CT>(qp, cp, bt, lens, op, B, H, KVH, NB, BS, TW, scale, window, ks, vs);
    case 128:
      return run_fast<128 / simd::W, QT, CK, CT>(qp, cp, bt, lens, op, B, H, KVH, NB, BS, TW, scale, window, ks, vs);
    default: break;
  }
  run_generic<QT, CK, CT>(qp, cp, bt, lens, op, B, H, D, KVH, NB, BS, TW, scale, window, ks, vs);
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor cache, torch::Tensor block_tables,
                               torch::Tensor context_lens, double scale, c10::optional<torch::Tensor> k_scale,
                               c10::optional<torch::Tensor> v_scale, std::string kind, bool bf16_dot,
                               int64_t window) {
  TORCH_CHECK(q.device().is_cpu() && cache.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && cache.dim() == 5 && cache.size(0) == 2, "q [B, H, D], cache [2, KVH, NB, BS, D]");
  TORCH_CHECK(q.is_contiguous() && cache.is_contiguous(), "q and cache must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KVH = cache.size(1), NB = cache.size(2), BS = cache.size(3);
  TORCH_CHECK(cache.size(4) == D && H % KVH == 0, "head_dim mismatch or heads not a multiple of kv_heads");
  auto bt = block_tables.to(torch::kInt64).contiguous();
  auto lens = context_lens.to(torch::kInt64).contiguous();
  TORCH_CHECK(bt.dim() == 2 && bt.size(0) == B && lens.numel() == B, "block_tables [B, TW], context_lens [B]");
  const int64_t TW = bt.size(1);
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t* bp = bt.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] <= TW * BS, "context length exceeds the block table");
    const int64_t used = (lp[b] + BS - 1) / BS;
    for (int64_t i = 0; i < used; ++i) TORCH_CHECK(bp[b * TW + i] >= 0 && bp[b * TW + i] < NB, "block id out of range");
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
      if (kind == "int8") run<QT, kInt8>(qp, cp, bp, lp, opp, B, H, D, KVH, NB, BS, TW, fs, window, kp, vp, bf16_dot);
      else run<QT, kFp8>(qp, cp, bp, lp, opp, B, H, D, KVH, NB, BS, TW, fs, window, kp, vp, bf16_dot);
    } else if (ct == torch::kFloat32) {
      run<QT, kF32>(qp, cache.data_ptr<float>(), bp, lp, opp, B, H, D, KVH, NB, BS, TW, fs, window, kp, vp, bf16_dot);
    } else if (ct == torch::kBFloat16) {
      const auto* cp = reinterpret_cast<const uint16_t*>(cache.data_ptr<at::BFloat16>());
      run<QT, kBF16>(qp, cp, bp, lp, opp, B, H, D, KVH, NB, BS, TW, fs, window, kp, vp, bf16_dot);
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
        py::arg("k_scale"), py::arg("v_scale"), py::arg("kind"), py::arg("bf16_dot"),
        py::arg("window"), py::call_guard<py::gil_scoped_release>());
}
