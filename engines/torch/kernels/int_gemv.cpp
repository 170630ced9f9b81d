// Weight-only INT8 and INT4 skinny GEMM for decode: y[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias),
// M small (1..32), x bf16 or fp32 (kept exact: W8A16 / W4A16), fp32 accumulation. Plus the matching
// dequantizers (large-M prefill: dequantize once, then F.linear).
//
// Why: decode is bound by streaming weights; torch's int8pack / int4pack CPU kernels stream them well
// below the machine's read rate at M = 1 and get much slower at M = 4..8 (docs/performance.md). These kernels read each weight byte
// once per call, in address order, and apply all M rows of x to it while it is in registers.
//
// How (shared with bf16_gemv.cpp: tiles, hsum16, row ranges per thread, software prefetch):
//  - x is converted once per call to fp32 (exact for bf16), zero padded to the kernel's K step, in a
//    64-byte aligned per-thread scratch buffer. Weights are widened to fp32 in registers and
//    multiplied with vfmadd231ps. Measured on this CPU: a 512-bit FMA issues twice per cycle
//    (32 MAC/cycle) whereas vdpbf16ps takes ~1.5-2 cycles (16-21 MAC/cycle) and also occupies the
//    shuffle port the int4 decode needs; a bf16 (vpermw + vdpbf16ps) int4 loop was no faster than the
//    fp32 one at M = 1 and converting int8 to bf16 costs more than to fp32 -- so the fp32 route, which
//    is also exact for fp32 x.
//  - int8 [N, K] (natural layout): per 16 weights vpmovsxbd + vcvtdq2ps, then one FMA per row of x.
//    The per-channel scale is applied to the fp32 sum: y = s[n] * sum_k x[k] q[n, k] (+ bias).
//  - int4: a layout chosen for the kernel (int_linear.pack_int4): each row is padded to a multiple of
//    64 columns and stored as chunks of 32 bytes = 16 little-endian uint16 words; word j of a chunk
//    holds column 16 r + j of that chunk in its nibble r (r = 0..3), as unsigned u = q + 8. One
//    vpmovzxwd widens a chunk to 16 dwords; (dword >> 4 r) indexes, through vpermps (which reads only
//    the low 4 bits of each index), a 16-entry fp32 table holding (u - 8 - z) * s for the current
//    group: the result is 16 consecutive dequantized weights, bit-identical to
//    engines.quant.rtn.dequantize's fp32 (q - z) * s, ready for the FMAs. The table costs one vector
//    multiply per row and chunk (the exact (q - z) row for each zero point z comes from a 1 KB
//    constant): group sizes 16, 32 and multiples of 64 are supported (a group is whole vectors of 16
//    columns). For bf16 x the table is rounded to bf16: the weights the large-M path's bf16 GEMM multiplies
//    by, so a token's weights do not depend on the size of its step. Affine codes (GGUF Q4_1) fill it with
//    d * u + m instead. With AVX512-BF16 (and groups of a multiple of 32) bf16 x takes vdpbf16ps tiles
//    instead (see "int4 ... with AVX512-BF16 dot products" below).
//  - A tile is R rows of W x MB rows of x: MB * R <= 16 fp32 accumulators reduced together by hsum16.
//    For MB <= 2 each weight row is consumed as it is decoded (few live registers); for MB >= 3 the
//    decoded vectors of all R rows are kept so that each x vector load serves R FMAs. M > 8 runs in
//    passes of 8 rows over ~16 KB blocks of W (L1-resident after the first pass).
//  - Each output element is one accumulator summed in a fixed order (k ascending per lane, then the
//    fixed hsum16 tree, then the scale multiply and the bias add as vector ops), whatever M, the tile
//    slot or the thread count: deterministic and batch-invariant.
//  - The GIL is released by the bindings.
#include "kiln_torch.h"

#include "kiln_bf16.h"

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kMaxMB = 8;             // rows of x per pass over a block of W rows
constexpr int64_t kPrefetch = 16384;  // bytes ahead in each row of a tile (as bf16_gemv)
constexpr int64_t kChunk = 64;        // int4: columns per 32-byte chunk

// Fully unrolled register-tile loops: without it GCC re-rolled the 16-row loop of the M = 1 tiles
// into a loop over an in-memory accumulator array.
#define KILN_UNROLL _Pragma("GCC unroll 16")
#define KILN_INLINE inline __attribute__((always_inline))

// Lane i of the result = sum of the 16 lanes of v[i] (see bf16_gemv.cpp).
static KILN_INLINE __m512 hsum16(const __m512 v[16]) {
  constexpr int P[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};
  __m512 a[8], b[4], c[2];
  KILN_UNROLL
  for (int i = 0; i < 8; ++i) {
    const __m512 x = v[P[i]], y = v[P[i + 8]];
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
  }
  KILN_UNROLL
  for (int i = 0; i < 4; ++i)
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 4], 0x88), _mm512_shuffle_f32x4(a[i], a[i + 4], 0xDD));
  KILN_UNROLL
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[i], b[i + 2], 0x44), _mm512_shuffle_ps(b[i], b[i + 2], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
}

// 16 fp32 -> bf16 bits in the low half of each dword, as torch's .to(bfloat16) (kiln_bf16.h)
using kiln::to_bf16_bits;

// Output: fp32 or bf16 [M, N] with row stride ld (elements), p at element (m0, n0).
struct Out {
  void* p;
  bool bf16;
  int64_t ld;
  inline Out at(int64_t m0, int64_t n0) const {
    const int64_t off = m0 * ld + n0;
    return {bf16 ? (void*)(static_cast<at::BFloat16*>(p) + off) : (void*)(static_cast<float*>(p) + off), bf16, ld};
  }
};

// Tile epilogue. Lane m * R + r of `sum` is the dot product of x row m with weight row r:
// y[m, r] = sum * sc[r] (when sc) + bias[r] (when bias), one fp32 multiply and one add (the same
// vector ops for every tile shape), then one rounding to bf16 when y is bf16. With a bf16 y and a per-channel
// scale (int8) the dot product is rounded to bf16 before the scale multiply: that is what the large-M path
// computes (a bf16 GEMM on the exact int8 codes, then the scale; engines/torch/layers/quantized.py), so a
// token gets the same bits whether its step was decode-sized or prefill-sized (prefix caching, chunked prefill).
template <int MB, int R>
static KILN_INLINE void epilogue(__m512 sum, const float* sc, const float* bias, const Out& y) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i ridx = _mm512_setr_epi32(0 % R, 1 % R, 2 % R, 3 % R, 4 % R, 5 % R, 6 % R, 7 % R, 8 % R, 9 % R,
                                         10 % R, 11 % R, 12 % R, 13 % R, 14 % R, 15 % R);
  const __mmask16 rm = (__mmask16)((1u << R) - 1);
  if (sc && y.bf16) sum = kiln::round_bf16(sum);
  if (sc) sum = _mm512_mul_ps(sum, _mm512_permutexvar_ps(ridx, _mm512_maskz_loadu_ps(rm, sc)));
  if (bias) sum = _mm512_add_ps(sum, _mm512_permutexvar_ps(ridx, _mm512_maskz_loadu_ps(rm, bias)));
  const __m512i bits = y.bf16 ? to_bf16_bits(sum) : _mm512_castps_si512(sum);
  KILN_UNROLL
  for (int m = 0; m < MB; ++m) {
    const __m512i v = m ? _mm512_permutexvar_epi32(_mm512_add_epi32(iota, _mm512_set1_epi32(m * R)), bits) : bits;
    if (y.bf16)
      _mm512_mask_cvtepi32_storeu_epi16(static_cast<uint16_t*>(y.p) + m * y.ld, rm, v);
    else
      _mm512_mask_storeu_epi32(static_cast<float*>(y.p) + m * y.ld, rm, v);
  }
}

// x [M, K] (bf16 or fp32, contiguous) -> fp32, zero padded to Kp columns, in the tiles' interleaved
// layout: the rows go in passes of up to kMaxMB (= the kernels' passes), pass p = rows m0 .. m0 + mb - 1
// at offset m0 * Kp, holding for each 16 columns k .. k + 15 the mb rows' 16 values in turn:
// x[m0 + m, k + j] at m0 * Kp + k * mb + 16 m + j. A tile then reaches all its rows of x from one
// pointer with constant offsets (one x row pointer each had spilled GCC's general registers).
// Decode-sized x goes to a per-thread scratch reused across calls (a call only uses it while it
// runs); larger x to `big`.
static const float* x_to_f32(const at::Tensor& x, int64_t M, int64_t K, int64_t Kp, at::Tensor& big) {
  constexpr int64_t kScratch = 64 * 1024;  // floats: 256 KB per calling thread at most
  static thread_local std::vector<float> buf;
  float* base;
  if (M * Kp + 16 <= kScratch) {
    if ((int64_t)buf.size() < M * Kp + 16) buf.resize(M * Kp + 16);
    base = buf.data();
  } else {
    big = at::empty({M * Kp + 16}, x.options().dtype(at::kFloat));
    base = big.data_ptr<float>();
  }
  // 64-byte aligned vectors (Kp is a multiple of 16): a misaligned 64-byte load spans two cache lines,
  // which halved the kernels' speed at M = 6..8, where x loads are a large share of the work.
  float* out = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(base) + 63) & ~uintptr_t(63));
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const uint16_t* xb = bf16 ? reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) : nullptr;
  const float* xf = bf16 ? nullptr : x.data_ptr<float>();
  for (int64_t m0 = 0; m0 < M; m0 += kMaxMB) {
    const int64_t mb = std::min<int64_t>(kMaxMB, M - m0);
    float* pass = out + m0 * Kp;
    for (int64_t m = 0; m < mb; ++m)
      for (int64_t k = 0; k < Kp; k += 16) {
        const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, K - k));
        const __mmask16 mask = (__mmask16)((1u << left) - 1);
        const int64_t src = (m0 + m) * K + k;
        const __m512 v = bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                    _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, xb + src)), 16))
                              : _mm512_maskz_loadu_ps(mask, xf + src);
        _mm512_store_ps(pass + k * mb + 16 * m, v);
      }
  }
  return out;
}

static inline int pick_threads(int64_t N, int64_t bytes) {
  // Tiny problems are not worth waking a second thread.
  return (bytes < 16384 || N < 32) ? 1 : std::max(1, at::get_num_threads());
}

// ------------------------------------------------------------------------------------------------
// int8
// ------------------------------------------------------------------------------------------------

static KILN_INLINE __m512 i8x16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
static KILN_INLINE __m512 i8x16(const int8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

// Accumulates 16 columns of R weight rows (k .. k + 15) against MB rows of x.
template <int MB, int R, bool FULL>
static KILN_INLINE void i8_step(__m512 (&acc)[16], const int8_t* __restrict w, int64_t K, const float* __restrict x,
                           int64_t k, __mmask16 mask) {
  if constexpr (MB <= 2) {  // few rows of x: consume each weight vector at once (few live registers)
    KILN_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m512 wv = FULL ? i8x16(w + r * K + k) : i8x16(w + r * K + k, mask);
      KILN_UNROLL
      for (int m = 0; m < MB; ++m)
        acc[m * R + r] = _mm512_fmadd_ps(_mm512_load_ps(x + k * MB + m * 16), wv, acc[m * R + r]);
    }
  } else {  // keep the R weight vectors so that each x load serves R FMAs
    __m512 wv[R];
    KILN_UNROLL
    for (int r = 0; r < R; ++r) wv[r] = FULL ? i8x16(w + r * K + k) : i8x16(w + r * K + k, mask);
    KILN_UNROLL
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_load_ps(x + k * MB + m * 16);
      KILN_UNROLL
      for (int r = 0; r < R; ++r) acc[m * R + r] = _mm512_fmadd_ps(xv, wv[r], acc[m * R + r]);
    }
  }
}

// y[m, r] = s[r] * dot(x[m, :], q[r, :]) + bias[r] for r < R, m < MB. x: this pass of x_to_f32's
// layout (Kp = round_up(K, 16) columns, zero past K).
template <int MB, int R>
static inline void i8_tile(const int8_t* __restrict w, int64_t K, const float* __restrict x,
                           const char* pf_end, const float* __restrict sc, const float* __restrict bias,
                           const Out& y) {
  static_assert(MB * R <= 16, "one hsum16 per tile");
  __m512 acc[16];
  KILN_UNROLL
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  if constexpr (MB <= 2 && R % 4 == 0) {
    // One or two rows of x (the LM head of a single-stream step): the tile's weight rows four at a time, each quad
    // to its end before the next, so that a thread reads 4 streams rather than R: the 49152 x 576 head took 13-23%
    // less time cold (A/B in one process, docs/performance.md). Every accumulator still sums its own lane of
    // columns in ascending order, so the result is the same bits as the interleaved tiles'.
    KILN_UNROLL
    for (int q = 0; q < R; q += 4) {
      int64_t k = 0;
      for (; k + 64 <= K; k += 64) {
        KILN_UNROLL
        for (int r = q; r < q + 4; ++r) {
          const char* pf = (const char*)(w + r * K + k) + kPrefetch;
          if (pf < pf_end) _mm_prefetch(pf, _MM_HINT_T0);
        }
        KILN_UNROLL
        for (int j = 0; j < 64; j += 16)
          KILN_UNROLL
          for (int r = q; r < q + 4; ++r) {
            const __m512 wv = i8x16(w + r * K + k + j);
            KILN_UNROLL
            for (int m = 0; m < MB; ++m)
              acc[m * R + r] = _mm512_fmadd_ps(_mm512_load_ps(x + (k + j) * MB + m * 16), wv, acc[m * R + r]);
          }
      }
      for (; k < K; k += 16) {  // tail: masked weight loads (zeros), x is zero padded
        const __mmask16 mask = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        KILN_UNROLL
        for (int r = q; r < q + 4; ++r) {
          const __m512 wv = i8x16(w + r * K + k, mask);
          KILN_UNROLL
          for (int m = 0; m < MB; ++m)
            acc[m * R + r] = _mm512_fmadd_ps(_mm512_load_ps(x + k * MB + m * 16), wv, acc[m * R + r]);
        }
      }
    }
    epilogue<MB, R>(hsum16(acc), sc, bias, y);
    return;
  }
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    KILN_UNROLL
    for (int r = 0; r < R; ++r) {
      const char* pf = (const char*)(w + r * K + k) + kPrefetch;
      if (pf < pf_end) _mm_prefetch(pf, _MM_HINT_T0);
    }
    i8_step<MB, R, true>(acc, w, K, x, k, 0xFFFF);
    i8_step<MB, R, true>(acc, w, K, x, k + 16, 0xFFFF);
    i8_step<MB, R, true>(acc, w, K, x, k + 32, 0xFFFF);
    i8_step<MB, R, true>(acc, w, K, x, k + 48, 0xFFFF);
  }
  for (; k < K; k += 16)  // tail: masked weight loads (zeros), x is zero padded
    i8_step<MB, R, false>(acc, w, K, x, k, K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1));
  epilogue<MB, R>(hsum16(acc), sc, bias, y);
}

template <int MB>
static void i8_rows(const int8_t* w, int64_t K, const float* x, int64_t n0, int64_t n1,
                    const char* pf_end, const float* sc, const float* bias, const Out& y) {
  constexpr int R = 16 / MB;
  int64_t n = n0;
  for (; n + R <= n1; n += R)
    i8_tile<MB, R>(w + n * K, K, x, pf_end, sc + n, bias ? bias + n : nullptr, y.at(0, n));
  for (; n < n1; ++n) i8_tile<MB, 1>(w + n * K, K, x, pf_end, sc + n, bias ? bias + n : nullptr, y.at(0, n));
}

// ------------------------------------------------------------------------------------------------
// int4
// ------------------------------------------------------------------------------------------------

struct I4Params {
  const uint8_t* w;     // packed rows, ldw bytes each (kernel layout)
  int64_t ldw;          // = Kp / 2
  int64_t chunks;       // = Kp / 64
  const float* sc;      // [N, G] (signed codes)
  const int8_t* zp;     // [N, G] or null
  const uint16_t* dm;   // affine codes: float16 (d, m) pairs [N, G, 2] (GGUF's own), w = d * u + m; null otherwise
  bool round_bf16;      // bf16 x: each decoded weight rounded to bf16, the value the large-M path's bf16
                        // dequantized weight holds (and, for GGUF blocks, the bf16 dense model's)
  int64_t G, gsize;
};

// How a code decodes: (u - 8) * s, (u - 8 - z) * s, or d * u + m (GGUF's Q4_1 blocks, ggml's dequantization:
// one fp32 multiply, then one add).
enum I4Mode { kSym = 0, kAsym = 1, kAffine = 2 };

// kZTab.v[8 + z][u] = u - 8 - z: the exact (q - z) of every code u = q + 8, per zero point z.
struct ZTab {
  alignas(64) float v[16][16];
  constexpr ZTab() : v() {
    for (int zz = 0; zz < 16; ++zz)
      for (int u = 0; u < 16; ++u) v[zz][u] = float(u - zz);
  }
};
static constexpr ZTab kZTab{};

// kiln::round_bf16 for a table's values, finite for finite scales: no NaN lane to keep, two ops fewer on the
// per-group path.
static KILN_INLINE __m512 round_bf16_finite(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_castsi512_ps(_mm512_and_si512(up, _mm512_set1_epi32(int(0xffff0000u))));
}

// A group's float16 (d, m) as two fp32 broadcasts (the AVX-512 form of vcvtph2ps: the build's flags do not
// include F16C's; lanes past the pair are converted from whatever the register holds and not used).
static KILN_INLINE void load_dm(const uint16_t* p, __m512& d, __m512& m) {
  const __m128 f = _mm512_castps512_ps128(
      _mm512_cvtph_ps(_mm256_castsi128_si256(_mm_cvtsi32_si128(*reinterpret_cast<const int32_t*>(p)))));
  d = _mm512_broadcastss_ps(f);
  m = _mm512_broadcastss_ps(_mm_movehdup_ps(f));
}

// 16-entry table of the values of codes u = 0..15 in group g of row `row`: (u - 8 - z) * s as rtn.dequantize
// computes it in fp32 (one vector multiply with or without zero points; the exact (q - z) row comes from kZTab,
// in L1), or d * u + m for affine codes. Unrounded: i4_table rounds it for bf16 x.
template <int MODE>
static KILN_INLINE __m512 i4_table_fp32(const I4Params& P, int64_t row, int64_t g) {
  const int64_t i = row * P.G + g;
  if constexpr (MODE == kAffine) {
    const __m512 u = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    // one FMA: u * d is exact in fp32 for a float16 d (4 x 11 significant bits), so this rounds as ggml's
    // multiply-then-add does
    __m512 d, m;
    load_dm(P.dm + 2 * i, d, m);
    return _mm512_fmadd_ps(u, d, m);
  } else if constexpr (MODE == kAsym) {
    // z in [-8, 7]; & 15: never out of bounds
    return _mm512_mul_ps(_mm512_load_ps(kZTab.v[(8 + int(P.zp[i])) & 15]), _mm512_set1_ps(P.sc[i]));
  } else {
    const __m512 q = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    return _mm512_mul_ps(q, _mm512_set1_ps(P.sc[i]));
  }
}

template <int MODE>
static KILN_INLINE __m512 i4_table(const I4Params& P, int64_t row, int64_t g) {
  const __m512 t = i4_table_fp32<MODE>(P, row, g);
  return P.round_bf16 ? round_bf16_finite(t) : t;
}

// Group of vector v (0..3) of chunk c. VPG = vectors of 16 columns per group within a chunk:
// 1 (g = 16), 2 (g = 32) or 4 (g % 64 == 0, where gc = the chunk's group is passed in).
template <int VPG>
static KILN_INLINE int64_t i4_group(int64_t c, int v, int64_t gc, int64_t G) {
  if constexpr (VPG == 4) return gc;
  return std::min<int64_t>(c * (4 / VPG) + v / VPG, G - 1);  // clamp: padded columns past K
}

template <int MB, int R, int VPG, int MODE>
static inline void i4_tile(const I4Params& P, int64_t n, const float* __restrict x,
                           const char* pf_end, const float* __restrict bias, const Out& y) {
  static_assert(MB * R <= 16, "one hsum16 per tile");
  __m512 acc[16];
  KILN_UNROLL
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  const uint8_t* w = P.w + n * P.ldw;
  const int64_t G = P.G, ldw = P.ldw;
  const int64_t cpg = VPG == 4 ? P.gsize / kChunk : 1;  // chunks per group
  int64_t gc = 0, cc = 0;                               // group of the current chunk (VPG == 4)

  for (int64_t c = 0; c < P.chunks; ++c) {
    if ((c & 1) == 0)
      KILN_UNROLL
      for (int r = 0; r < R; ++r) {
        const char* pf = (const char*)(w + r * ldw + c * 32) + kPrefetch;
        if (pf < pf_end) _mm_prefetch(pf, _MM_HINT_T0);
      }
    const float* xc = x + c * kChunk * MB;
    if constexpr (MB <= 2) {
      KILN_UNROLL
      for (int r = 0; r < R; ++r) {
        const __m512i wd = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(w + r * ldw + c * 32)));
        __m512 tab;
        KILN_UNROLL
        for (int v = 0; v < 4; ++v) {
          if (v % VPG == 0) tab = i4_table<MODE>(P, n + r, i4_group<VPG>(c, v, gc, G));
          const __m512 wv = _mm512_permutexvar_ps(v ? _mm512_srli_epi32(wd, 4 * v) : wd, tab);
          KILN_UNROLL
          for (int m = 0; m < MB; ++m)
            acc[m * R + r] = _mm512_fmadd_ps(_mm512_load_ps(xc + 16 * v * MB + m * 16), wv, acc[m * R + r]);
        }
      }
    } else {
      __m512i wd[R];
      __m512 tab[R];
      KILN_UNROLL
      for (int r = 0; r < R; ++r)
        wd[r] = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(w + r * ldw + c * 32)));
      KILN_UNROLL
      for (int v = 0; v < 4; ++v) {
        __m512 wv[R];
        KILN_UNROLL
        for (int r = 0; r < R; ++r) {
          if (v % VPG == 0)
            tab[r] = i4_table<MODE>(P, n + r, i4_group<VPG>(c, v, gc, G));
          wv[r] = _mm512_permutexvar_ps(v ? _mm512_srli_epi32(wd[r], 4 * v) : wd[r], tab[r]);
        }
        KILN_UNROLL
        for (int m = 0; m < MB; ++m) {
          const __m512 xv = _mm512_load_ps(xc + 16 * v * MB + m * 16);
          KILN_UNROLL
          for (int r = 0; r < R; ++r) acc[m * R + r] = _mm512_fmadd_ps(xv, wv[r], acc[m * R + r]);
        }
      }
    }
    if constexpr (VPG == 4)
      if (++cc == cpg) cc = 0, ++gc;
  }

  epilogue<MB, R>(hsum16(acc), nullptr, bias, y);
}

template <int MB, int VPG, int MODE>
static void i4_rows(const I4Params& P, const float* x, int64_t n0, int64_t n1, const char* pf_end,
                    const float* bias, const Out& y) {
  constexpr int R = 16 / MB;
  int64_t n = n0;
  for (; n + R <= n1; n += R) i4_tile<MB, R, VPG, MODE>(P, n, x, pf_end, bias ? bias + n : nullptr, y.at(0, n));
  for (; n < n1; ++n) i4_tile<MB, 1, VPG, MODE>(P, n, x, pf_end, bias ? bias + n : nullptr, y.at(0, n));
}

template <int VPG, int MODE>
static void i4_rows_mb(int mb, const I4Params& P, const float* x, int64_t n0, int64_t n1,
                       const char* pf_end, const float* bias, const Out& y) {
  switch (mb) {
    case 1: i4_rows<1, VPG, MODE>(P, x, n0, n1, pf_end, bias, y); break;
    case 2: i4_rows<2, VPG, MODE>(P, x, n0, n1, pf_end, bias, y); break;
    case 3: i4_rows<3, VPG, MODE>(P, x, n0, n1, pf_end, bias, y); break;
    case 4: i4_rows<4, VPG, MODE>(P, x, n0, n1, pf_end, bias, y); break;
    case 5: i4_rows<5, VPG, MODE>(P, x, n0, n1, pf_end, bias, y); break;
    case 6: i4_rows<6, VPG, MODE>(P, x, n0, n1, pf_end, bias, y); break;
    case 7: i4_rows<7, VPG, MODE>(P, x, n0, n1, pf_end, bias, y); break;
    default: i4_rows<8, VPG, MODE>(P, x, n0, n1, pf_end, bias, y); break;
  }
}

// ------------------------------------------------------------------------------------------------
// int4 (groups of a multiple of 32 columns) against bf16 x with AVX512-BF16 dot products. A bf16 step's
// weights are the decoded values rounded to bf16: vcvtneps2bf16 rounds a group's 16-entry table in one
// instruction (the fp32 path needs five integer ops per table, which made the affine codes twice as slow as
// the symmetric ones), vpermw looks up 32 weights at once and vdpbf16ps multiplies them with 32 bf16 x values
// (products exact in fp32, summed in fp32). Only where extension.cpu_flags() has avx512_bf16 (the Python
// caller passes it), so that KILN_CPU_ISA below avx512bf16 keeps the fp32 path.
// ------------------------------------------------------------------------------------------------

#define KILN_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// x [M, K] bf16 -> bf16 zero padded to Kp columns in passes of up to kMaxMB rows: pass m0 at m0 * Kp, then for
// each 32 columns k .. k + 31 the mb rows' 32 values in turn (x[m0 + m, k + j] at m0 * Kp + k * mb + 32 m + j).
static const uint16_t* x_to_bf16_blocks(const at::Tensor& x, int64_t M, int64_t K, int64_t Kp, at::Tensor& buf) {
  buf = at::zeros({M * Kp + 32}, x.options().dtype(at::kBFloat16));
  uint16_t* out = reinterpret_cast<uint16_t*>(
      (reinterpret_cast<uintptr_t>(buf.data_ptr<at::BFloat16>()) + 63) & ~uintptr_t(63));
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  for (int64_t m0 = 0; m0 < M; m0 += kMaxMB) {
    const int64_t mb = std::min<int64_t>(kMaxMB, M - m0);
    for (int64_t m = 0; m < mb; ++m)
      for (int64_t k = 0; k < K; k += 32)
        std::memcpy(out + m0 * Kp + k * mb + 32 * m, xb + (m0 + m) * K + k,
                    sizeof(uint16_t) * std::min<int64_t>(32, K - k));
  }
  return out;
}

// The group's 16 weights as bf16, in both 256-bit halves (vpermw then ignores index bit 4).
template <int MODE>
KILN_AVX512_BF16 static KILN_INLINE __m512i i4_table_bf16(const I4Params& P, int64_t row, int64_t g) {
  return _mm512_broadcast_i64x4((__m256i)_mm512_cvtneps_pbh(i4_table_fp32<MODE>(P, row, g)));
}

template <int MB, int R, int MODE>
KILN_AVX512_BF16 static inline void i4_dot_tile(const I4Params& P, int64_t n, const uint16_t* __restrict x,
                                                       const char* pf_end, const float* __restrict bias,
                                                       const Out& y) {
  static_assert(MB * R <= 16, "one hsum16 per tile");
  __m512 acc[16];
  KILN_UNROLL
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  // lanes 0-15 take nibble 2h of word j (column 32h + j), lanes 16-31 nibble 2h + 1 (column 32h + 16 + j)
  const __m512i shift0 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
  const __m512i shift1 = _mm512_add_epi16(shift0, _mm512_set1_epi16(8));
  const int64_t G = P.G;
  for (int64_t c = 0; c < P.chunks; ++c) {
    if ((c & 1) == 0)
      KILN_UNROLL
      for (int r = 0; r < R; ++r) {
        const char* pf = (const char*)(P.w + (n + r) * P.ldw + c * 32) + kPrefetch;
        if (pf < pf_end) _mm_prefetch(pf, _MM_HINT_T0);
      }
    KILN_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m512i words = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(P.w + (n + r) * P.ldw + c * 32)));
      KILN_UNROLL
      for (int h = 0; h < 2; ++h) {
        // clamp: padded columns past K (x is zero there)
        const int64_t g = std::min<int64_t>((c * kChunk + 32 * h) / P.gsize, G - 1);
        const __m512i wv = _mm512_permutexvar_epi16(_mm512_srlv_epi16(words, h ? shift1 : shift0),
                                                    i4_table_bf16<MODE>(P, n + r, g));
        KILN_UNROLL
        for (int m = 0; m < MB; ++m) {
          const __m512i xv = _mm512_load_si512((const void*)(x + (c * 64 + 32 * h) * MB + 32 * m));
          acc[m * R + r] = _mm512_dpbf16_ps(acc[m * R + r], (__m512bh)wv, (__m512bh)xv);
        }
      }
    }
  }
  epilogue<MB, R>(hsum16(acc), nullptr, bias, y);
}

template <int MB, int MODE>
KILN_AVX512_BF16 static void i4_dot_rows(const I4Params& P, const uint16_t* x, int64_t n0, int64_t n1,
                                         const char* pf_end, const float* bias, const Out& y) {
  constexpr int R = 16 / MB;
  int64_t n = n0;
  for (; n + R <= n1; n += R) i4_dot_tile<MB, R, MODE>(P, n, x, pf_end, bias ? bias + n : nullptr, y.at(0, n));
  for (; n < n1; ++n) i4_dot_tile<MB, 1, MODE>(P, n, x, pf_end, bias ? bias + n : nullptr, y.at(0, n));
}

template <int MODE>
KILN_AVX512_BF16 static void i4_dot_rows_mb(int mb, const I4Params& P, const uint16_t* x, int64_t n0, int64_t n1,
                                            const char* pf_end, const float* bias, const Out& y) {
  switch (mb) {
    case 1: i4_dot_rows<1, MODE>(P, x, n0, n1, pf_end, bias, y); break;
    case 2: i4_dot_rows<2, MODE>(P, x, n0, n1, pf_end, bias, y); break;
    case 3: i4_dot_rows<3, MODE>(P, x, n0, n1, pf_end, bias, y); break;
    case 4: i4_dot_rows<4, MODE>(P, x, n0, n1, pf_end, bias, y); break;
    case 5: i4_dot_rows<5, MODE>(P, x, n0, n1, pf_end, bias, y); break;
    case 6: i4_dot_rows<6, MODE>(P, x, n0, n1, pf_end, bias, y); break;
    case 7: i4_dot_rows<7, MODE>(P, x, n0, n1, pf_end, bias, y); break;
    default: i4_dot_rows<8, MODE>(P, x, n0, n1, pf_end, bias, y); break;
  }
}

template <int MODE>
static void i4_rows_vpg(int vpg, int mb, const I4Params& P, const float* x, int64_t n0, int64_t n1,
                        const char* pf_end, const float* bias, const Out& y) {
  if (vpg == 4) i4_rows_mb<4, MODE>(mb, P, x, n0, n1, pf_end, bias, y);
  else if (vpg == 2) i4_rows_mb<2, MODE>(mb, P, x, n0, n1, pf_end, bias, y);
  else i4_rows_mb<1, MODE>(mb, P, x, n0, n1, pf_end, bias, y);
}

// ------------------------------------------------------------------------------------------------
// Shared driver: rows [n0, n1) of W against all M rows of x in passes of up to kMaxMB rows. For
// M > 8 the rows go in blocks of ~16 KB so that the passes after the first find them in L1.
// ------------------------------------------------------------------------------------------------

template <class RowsFn>
static void rows_any_m(RowsFn&& rows, int64_t M, int64_t row_bytes, int64_t n0, int64_t n1) {
  const int64_t step =
      M <= kMaxMB ? (n1 - n0) : std::max<int64_t>(16, 16384 / std::max<int64_t>(row_bytes, 1) / 16 * 16);
  for (int64_t b0 = n0; b0 < n1; b0 += step) {
    const int64_t b1 = std::min(n1, b0 + step);
    for (int64_t m0 = 0; m0 < M; m0 += kMaxMB) rows((int)std::min<int64_t>(kMaxMB, M - m0), m0, b0, b1);
  }
}

// Contiguous row ranges per thread, boundaries on multiples of 16 rows (whole tiles for any MB).
#define KILN_PARALLEL_ROWS(N, nt, BODY)                                 \
  _Pragma("omp parallel num_threads(nt)") {                             \
    const int t_ = omp_get_thread_num(), T_ = omp_get_num_threads();    \
    const int64_t per_ = ((N) / T_) / 16 * 16;                          \
    const int64_t n0 = t_ * per_, n1 = (t_ == T_ - 1) ? (N) : n0 + per_; \
    BODY;                                                               \
  }

struct Prep {
  at::Tensor x;  // [M, K] contiguous
  int64_t M, K;
  bool flat;
};

static Prep prep_x(const at::Tensor& x_in, int64_t K, const char* name) {
  TORCH_CHECK(x_in.device().is_cpu(), name, ": CPU tensors only");
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 || x_in.scalar_type() == at::kFloat, name,
              ": x must be bfloat16 or float32");
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == K, name, ": x must be [..., K] with K = ", K);
  const bool flat = x_in.dim() == 2;
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x_in.dim(); ++d) M *= x_in.size(d);
  return {flat ? x_in.contiguous() : x_in.reshape({M, K}).contiguous(), M, K, flat};
}

static at::Tensor finish(const at::Tensor& y, const at::Tensor& x_in, bool flat, int64_t N) {
  if (flat) return y;
  auto sizes = x_in.sizes().vec();
  sizes.back() = N;
  return y.view(sizes);
}

static at::Tensor bias_f32(const c10::optional<at::Tensor>& b, int64_t N, const char* name) {
  if (!b.has_value() || !b->defined()) return at::Tensor();
  TORCH_CHECK(b->device().is_cpu() && b->numel() == N && at::isFloatingType(b->scalar_type()), name,
              ": bias must be a float CPU tensor with N elements");
  return b->scalar_type() == at::kFloat ? b->contiguous() : b->to(at::kFloat).contiguous();
}

at::Tensor int8_linear(const at::Tensor& x_in, const at::Tensor& qweight_in, const at::Tensor& scales_in,
                       const c10::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(qweight_in.device().is_cpu() && qweight_in.scalar_type() == at::kChar && qweight_in.dim() == 2,
              "int8_linear: qweight must be int8 [N, K] on CPU");
  const int64_t N = qweight_in.size(0), K = qweight_in.size(1);
  TORCH_CHECK(scales_in.device().is_cpu() && scales_in.scalar_type() == at::kFloat && scales_in.numel() == N,
              "int8_linear: scales must be float32 [N]");
  Prep p = prep_x(x_in, K, "int8_linear");
  const at::Tensor qweight = qweight_in.contiguous(), scales = scales_in.contiguous();
  const at::Tensor bias = bias_f32(bias_in, N, "int8_linear");
  const int64_t M = p.M;
  at::Tensor y = at::empty({M, N}, p.x.options());
  if (M > 0 && N > 0) {
    if (K == 0) {
      bias.defined() ? y.copy_(bias.view({1, N}).expand({M, N})) : y.zero_();
    } else {
      const int64_t Kp = (K + 15) / 16 * 16;
      at::Tensor xbig;
      const float* x = x_to_f32(p.x, M, K, Kp, xbig);
      const int8_t* w = qweight.data_ptr<int8_t>();
      const float* sc = scales.data_ptr<float>();
      const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
      const Out out{y.data_ptr(), y.scalar_type() == at::kBFloat16, N};
      const int nt = pick_threads(N, N * K);
      KILN_PARALLEL_ROWS(N, nt, {
        const char* pf_end = (const char*)(w + n1 * K);
        rows_any_m(
            [&](int mb, int64_t m0, int64_t b0, int64_t b1) {
              const float* xm = x + m0 * Kp;
              const Out ym = out.at(m0, 0);
              switch (mb) {
                case 1: i8_rows<1>(w, K, xm, b0, b1, pf_end, sc, bp, ym); break;
                case 2: i8_rows<2>(w, K, xm, b0, b1, pf_end, sc, bp, ym); break;
                case 3: i8_rows<3>(w, K, xm, b0, b1, pf_end, sc, bp, ym); break;
                case 4: i8_rows<4>(w, K, xm, b0, b1, pf_end, sc, bp, ym); break;
                case 5: i8_rows<5>(w, K, xm, b0, b1, pf_end, sc, bp, ym); break;
                case 6: i8_rows<6>(w, K, xm, b0, b1, pf_end, sc, bp, ym); break;
                case 7: i8_rows<7>(w, K, xm, b0, b1, pf_end, sc, bp, ym); break;
                default: i8_rows<8>(w, K, xm, b0, b1, pf_end, sc, bp, ym); break;
              }
            },
            M, K, n0, n1);
      });
    }
  }
  return finish(y, x_in, p.flat, N);
}

static int vpg_of(int64_t g) { return g == 16 ? 1 : g == 32 ? 2 : (g > 0 && g % 64 == 0) ? 4 : 0; }

// The packed codes' shape, and the group size, checked against K: the part every int4 form shares.
static I4Params check_packed(const at::Tensor& packed, int64_t group_size, int64_t K, const char* name) {
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.dim() == 2 &&
                  packed.is_contiguous(),
              name, ": packed must be contiguous uint8 [N, Kp/2] on CPU (int_linear.pack_int4)");
  const int64_t Kp = packed.size(1) * 2;
  TORCH_CHECK(Kp % kChunk == 0 && K <= Kp && Kp - K < kChunk, name, ": packed rows hold ", Kp,
              " columns, which is not K = ", K, " rounded up to a multiple of 64");
  TORCH_CHECK(vpg_of(group_size) != 0 && K % group_size == 0, name, ": group_size must be 16, 32 or a multiple of 64 "
              "dividing K, got ", group_size, " for K = ", K);
  return {packed.data_ptr<uint8_t>(), Kp / 2, Kp / kChunk, nullptr, nullptr, nullptr, false, K / group_size,
          group_size};
}

static I4Params check_i4(const at::Tensor& packed, const at::Tensor& scales_in, const c10::optional<at::Tensor>& zeros,
                         int64_t group_size, int64_t K, const char* name, at::Tensor& scales, at::Tensor& zeros_keep) {
  I4Params P = check_packed(packed, group_size, K, name);
  const int64_t N = packed.size(0), G = P.G;
  TORCH_CHECK(scales_in.device().is_cpu() && scales_in.scalar_type() == at::kFloat && scales_in.dim() == 2 &&
                  scales_in.size(0) == N && scales_in.size(1) == G,
              name, ": scales must be float32 [N, K / group_size]");
  scales = scales_in.contiguous();
  P.sc = scales.data_ptr<float>();
  if (zeros.has_value() && zeros->defined()) {
    TORCH_CHECK(zeros->device().is_cpu() && zeros->scalar_type() == at::kChar && zeros->dim() == 2 &&
                    zeros->size(0) == N && zeros->size(1) == G,
                name, ": zeros must be int8 [N, K / group_size]");
    zeros_keep = zeros->contiguous();
    P.zp = zeros_keep.data_ptr<int8_t>();
  }
  return P;
}

static I4Params check_affine(const at::Tensor& packed, const at::Tensor& dm, int64_t group_size, int64_t K,
                             bool round_bf16, const char* name) {
  I4Params P = check_packed(packed, group_size, K, name);
  TORCH_CHECK(dm.device().is_cpu() && dm.scalar_type() == at::kHalf && dm.is_contiguous() && dm.dim() == 3 &&
                  dm.size(0) == packed.size(0) && dm.size(1) == P.G && dm.size(2) == 2,
              name, ": dm must be contiguous float16 [N, K / group_size, 2] (d, m per group)");
  P.dm = reinterpret_cast<const uint16_t*>(dm.data_ptr<at::Half>());
  P.round_bf16 = round_bf16;
  return P;
}

static at::Tensor run_int4_linear(const I4Params& P, const at::Tensor& x_in, const c10::optional<at::Tensor>& bias_in,
                                  int64_t N, const char* name, bool bf16_dot = false) {
  const int64_t K = x_in.size(-1), Kp = P.chunks * kChunk;
  Prep p = prep_x(x_in, K, name);
  const at::Tensor bias = bias_f32(bias_in, N, name);
  const int64_t M = p.M;
  at::Tensor y = at::empty({M, N}, p.x.options());
  if (M > 0 && N > 0) {
    if (K == 0) {
      bias.defined() ? y.copy_(bias.view({1, N}).expand({M, N})) : y.zero_();
    } else if (bf16_dot) {
      at::Tensor xbuf;
      const uint16_t* x = x_to_bf16_blocks(p.x, M, K, Kp, xbuf);
      const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
      const Out out{y.data_ptr(), true, N};
      const int nt = pick_threads(N, N * P.ldw);
      KILN_PARALLEL_ROWS(N, nt, {
        const char* pf_end = (const char*)(P.w + n1 * P.ldw);
        rows_any_m(
            [&](int mb, int64_t m0, int64_t b0, int64_t b1) {
              const uint16_t* xm = x + m0 * Kp;
              const Out ym = out.at(m0, 0);
              if (P.dm) i4_dot_rows_mb<kAffine>(mb, P, xm, b0, b1, pf_end, bp, ym);
              else if (P.zp) i4_dot_rows_mb<kAsym>(mb, P, xm, b0, b1, pf_end, bp, ym);
              else i4_dot_rows_mb<kSym>(mb, P, xm, b0, b1, pf_end, bp, ym);
            },
            M, P.ldw, n0, n1);
      });
    } else {
      at::Tensor xbig;
      const float* x = x_to_f32(p.x, M, K, Kp, xbig);
      const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
      const Out out{y.data_ptr(), y.scalar_type() == at::kBFloat16, N};
      const int vpg = vpg_of(P.gsize);
      const int mode = P.dm ? kAffine : P.zp ? kAsym : kSym;
      const int nt = pick_threads(N, N * P.ldw);
      KILN_PARALLEL_ROWS(N, nt, {
        const char* pf_end = (const char*)(P.w + n1 * P.ldw);
        rows_any_m(
            [&](int mb, int64_t m0, int64_t b0, int64_t b1) {
              const float* xm = x + m0 * Kp;
              const Out ym = out.at(m0, 0);
              if (mode == kAffine) i4_rows_vpg<kAffine>(vpg, mb, P, xm, b0, b1, pf_end, bp, ym);
              else if (mode == kAsym) i4_rows_vpg<kAsym>(vpg, mb, P, xm, b0, b1, pf_end, bp, ym);
              else i4_rows_vpg<kSym>(vpg, mb, P, xm, b0, b1, pf_end, bp, ym);
            },
            M, P.ldw, n0, n1);
      });
    }
  }
  return finish(y, x_in, p.flat, N);
}

// bf16 x: the weights rounded to bf16 (i4_table), as int4_dequantize gives the large-M path; bf16_dot: the CPU
// has AVX512-BF16 (as extension.cpu_flags() says), and groups of a multiple of 32 take the vdpbf16ps tiles.
at::Tensor int4_linear(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& zeros, int64_t group_size,
                       const c10::optional<at::Tensor>& bias_in, bool bf16_dot) {
  TORCH_CHECK(x_in.dim() >= 1, "int4_linear: x must be [..., K]");
  at::Tensor skeep, zkeep;
  I4Params P = check_i4(packed, scales, zeros, group_size, x_in.size(-1), "int4_linear", skeep, zkeep);
  P.round_bf16 = x_in.scalar_type() == at::kBFloat16;
  return run_int4_linear(P, x_in, bias_in, packed.size(0), "int4_linear", bf16_dot && P.round_bf16 && group_size % 32 == 0);
}

// Affine codes: each weight is d * u + m, rounded to bf16 when x (and so the layer's dtype) is bf16, so decode
// computes with the very weights int4_affine_dequantize gives the large-M path.
// bf16_dot: the CPU has AVX512-BF16 (as extension.cpu_flags() says); bf16 x with groups of 32 then takes the
// vdpbf16ps tiles (same weights, fp32 sums in another order).
at::Tensor int4_affine_linear(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& dm,
                              int64_t group_size, const c10::optional<at::Tensor>& bias_in, bool bf16_dot) {
  TORCH_CHECK(x_in.dim() >= 1, "int4_affine_linear: x must be [..., K]");
  const bool bf16 = x_in.scalar_type() == at::kBFloat16;
  const I4Params P = check_affine(packed, dm, group_size, x_in.size(-1), bf16, "int4_affine_linear");
  return run_int4_linear(P, x_in, bias_in, packed.size(0), "int4_affine_linear", bf16_dot && bf16 && group_size % 32 == 0);
}

// ------------------------------------------------------------------------------------------------
// Dequantization to [N, K] fp32 / bf16 (large-M prefill: dequantize once, then F.linear).
// ------------------------------------------------------------------------------------------------

static inline void store16(void* out, bool bf16, int64_t off, __m512 v, __mmask16 mask) {
  if (bf16)
    _mm512_mask_cvtepi32_storeu_epi16(static_cast<uint16_t*>(out) + off, mask, to_bf16_bits(v));
  else
    _mm512_mask_storeu_ps(static_cast<float*>(out) + off, mask, v);
}

// `out`, when given, must be a contiguous [N, K] tensor of `dtype` (a caller's reusable buffer).
static at::Tensor dequant_out(const c10::optional<at::Tensor>& out, int64_t N, int64_t K, at::ScalarType dtype,
                              const at::TensorOptions& opts, const char* name) {
  if (!out.has_value() || !out->defined()) return at::empty({N, K}, opts.dtype(dtype));
  TORCH_CHECK(out->device().is_cpu() && out->scalar_type() == dtype && out->is_contiguous() && out->dim() == 2 &&
                  out->size(0) == N && out->size(1) == K,
              name, ": out must be a contiguous CPU tensor [N, K] of the requested dtype");
  return *out;
}

at::Tensor int8_dequantize(const at::Tensor& qweight_in, const at::Tensor& scales_in, at::ScalarType dtype,
                           const c10::optional<at::Tensor>& out_in) {
  TORCH_CHECK(qweight_in.device().is_cpu() && qweight_in.scalar_type() == at::kChar && qweight_in.dim() == 2,
              "int8_dequantize: qweight must be int8 [N, K] on CPU");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "int8_dequantize: dtype must be float32 or bfloat16");
  const int64_t N = qweight_in.size(0), K = qweight_in.size(1);
  TORCH_CHECK(scales_in.scalar_type() == at::kFloat && scales_in.numel() == N,
              "int8_dequantize: scales must be float32 [N]");
  const at::Tensor q = qweight_in.contiguous(), scales = scales_in.contiguous();
  at::Tensor out = dequant_out(out_in, N, K, dtype, q.options(), "int8_dequantize");
  const int8_t* w = q.data_ptr<int8_t>();
  const float* sc = scales.data_ptr<float>();
  void* o = out.data_ptr();
  const bool bf16 = dtype == at::kBFloat16;
  const int nt = pick_threads(N, N * K);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const __m512 s = _mm512_set1_ps(sc[n]);
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mask = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
      store16(o, bf16, n * K + k, _mm512_mul_ps(i8x16(w + n * K + k, mask), s), mask);
    }
  }
  return out;
}

template <int MODE>
static void i4_dequant_row(const I4Params& P, int64_t n, int64_t K, void* o, bool bf16) {
  const uint8_t* w = P.w + n * P.ldw;
  for (int64_t c = 0; c < P.chunks; ++c) {
    const __m512i wd = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(w + c * 32)));
    KILN_UNROLL
    for (int v = 0; v < 4; ++v) {
      const int64_t k = c * kChunk + 16 * v;
      if (k >= K) break;
      const __m512 tab = i4_table<MODE>(P, n, k / P.gsize);
      const __m512 wv = _mm512_permutexvar_ps(_mm512_srli_epi32(wd, 4 * v), tab);
      const __mmask16 mask = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
      store16(o, bf16, n * K + k, wv, mask);
    }
  }
}

// bf16 out with AVX512-BF16 and groups of a multiple of 32: the dot tiles' decoding (i4_dot_tile), 32 weights per
// vpermw from a group's table rounded by vcvtneps2bf16. The same bf16 values as i4_dequant_row's (both round the
// fp32 table to nearest even, and a finite table has no NaN), at about a third of the instructions: a step with
// prompt rows dequantizes every layer, and so does one of more than SMALL_M_MAX_INT4 decode rows.
template <int MODE>
KILN_AVX512_BF16 static void i4_dequant_row_bf16(const I4Params& P, int64_t n, int64_t K, uint16_t* o) {
  const __m512i shift0 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
  const __m512i shift1 = _mm512_add_epi16(shift0, _mm512_set1_epi16(8));
  const uint8_t* w = P.w + n * P.ldw;
  for (int64_t c = 0; c < P.chunks; ++c) {
    const __m512i words = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(w + c * 32)));
    KILN_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int64_t k = c * kChunk + 32 * h;
      if (k >= K) break;
      const __m512i wv = _mm512_permutexvar_epi16(_mm512_srlv_epi16(words, h ? shift1 : shift0),
                                                  i4_table_bf16<MODE>(P, n, k / P.gsize));
      const __mmask32 mask = K - k >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (K - k)) - 1);
      _mm512_mask_storeu_epi16(o + n * K + k, mask, wv);
    }
  }
}

static at::Tensor run_int4_dequantize(const I4Params& P, int64_t N, int64_t K, at::ScalarType dtype,
                                      const at::Tensor& packed, const c10::optional<at::Tensor>& out_in,
                                      const char* name, bool bf16_dot) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, name, ": dtype must be float32 or bfloat16");
  at::Tensor out = dequant_out(out_in, N, K, dtype, packed.options(), name);
  void* o = out.data_ptr();
  const bool bf16 = dtype == at::kBFloat16;
  const bool dot = bf16_dot && bf16 && P.gsize % 32 == 0;
  uint16_t* ob = static_cast<uint16_t*>(o);
  const int mode = P.dm ? kAffine : P.zp ? kAsym : kSym;
  const int nt = pick_threads(N, N * P.ldw);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    if (dot) {
      if (mode == kAffine) i4_dequant_row_bf16<kAffine>(P, n, K, ob);
      else if (mode == kAsym) i4_dequant_row_bf16<kAsym>(P, n, K, ob);
      else i4_dequant_row_bf16<kSym>(P, n, K, ob);
    } else if (mode == kAffine) i4_dequant_row<kAffine>(P, n, K, o, bf16);
    else if (mode == kAsym) i4_dequant_row<kAsym>(P, n, K, o, bf16);
    else i4_dequant_row<kSym>(P, n, K, o, bf16);
  }
  return out;
}

at::Tensor int4_dequantize(const at::Tensor& packed, const at::Tensor& scales, const c10::optional<at::Tensor>& zeros,
                           int64_t group_size, int64_t K, at::ScalarType dtype,
                           const c10::optional<at::Tensor>& out_in, bool bf16_dot) {
  at::Tensor skeep, zkeep;
  const I4Params P = check_i4(packed, scales, zeros, group_size, K, "int4_dequantize", skeep, zkeep);  // unrounded:
  // store16 rounds to a bf16 out once
  return run_int4_dequantize(P, packed.size(0), K, dtype, packed, out_in, "int4_dequantize", bf16_dot);
}

// d * u + m as [N, K]; rounded to bf16 when dtype is bf16 (as int4_affine_linear decodes for bf16 x).
at::Tensor int4_affine_dequantize(const at::Tensor& packed, const at::Tensor& dm, int64_t group_size, int64_t K,
                                  at::ScalarType dtype, const c10::optional<at::Tensor>& out_in, bool bf16_dot) {
  const I4Params P = check_affine(packed, dm, group_size, K, dtype == at::kBFloat16, "int4_affine_dequantize");
  return run_int4_dequantize(P, packed.size(0), K, dtype, packed, out_in, "int4_affine_dequantize", bf16_dot);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_linear", &int8_linear, "y = x @ (q * s[:, None])^T (+ bias): W8A16, fp32 accumulation", py::arg("x"),
        py::arg("qweight"), py::arg("scales"), py::arg("bias") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("int4_linear", &int4_linear, "y = x @ dequant(W4)^T (+ bias): W4A16 group-wise, fp32 accumulation",
        py::arg("x"), py::arg("packed"), py::arg("scales"), py::arg("zeros"), py::arg("group_size"),
        py::arg("bias") = py::none(), py::arg("bf16_dot") = false, py::call_guard<py::gil_scoped_release>());
  m.def("int8_dequantize", &int8_dequantize, "q * s[:, None] as [N, K] float32/bfloat16", py::arg("qweight"),
        py::arg("scales"), py::arg("dtype"), py::arg("out") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("int4_dequantize", &int4_dequantize, "(q - z) * s as [N, K] float32/bfloat16", py::arg("packed"),
        py::arg("scales"), py::arg("zeros"), py::arg("group_size"), py::arg("K"), py::arg("dtype"),
        py::arg("out") = py::none(), py::arg("bf16_dot") = false, py::call_guard<py::gil_scoped_release>());
  m.def("int4_affine_linear", &int4_affine_linear, "y = x @ (d * u + m)^T (+ bias): affine int4 codes (GGUF Q4_1)",
        py::arg("x"), py::arg("packed"), py::arg("dm"), py::arg("group_size"), py::arg("bias") = py::none(),
        py::arg("bf16_dot") = false, py::call_guard<py::gil_scoped_release>());
  m.def("int4_affine_dequantize", &int4_affine_dequantize, "d * u + m as [N, K] float32/bfloat16", py::arg("packed"),
        py::arg("dm"), py::arg("group_size"), py::arg("K"), py::arg("dtype"), py::arg("out") = py::none(),
        py::arg("bf16_dot") = false, py::call_guard<py::gil_scoped_release>());
}
