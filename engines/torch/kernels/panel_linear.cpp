// Weight-only linear layers against bf16 x in 16-row panels (AVX512-BF16), for steps of many rows: GGUF Q4_1 codes
// with the unrounded weights, and int8 per-channel codes.
//
// Why panels: int_gemv.cpp's kernels keep one weight row's columns in a vector and sum its lanes at the end, right for
// a step of a few rows (bound by reading the weights), but every 32 weights of every row then cost a decode (a table
// per group and row, a d-scaled dot per row of x, a widening) that a step of 32 rows repeats over 4 passes: there
// they ran at under half the machine's bf16 dot-product rate. Here a vector holds 16 output columns (16 rows of W)
// times one pair of inputs, the layout of AVX512-BF16's dot product with x's pair broadcast from memory (as oneDNN's
// brgemm does), so one decoded vector serves every row of x in a pass (up to kMaxMB) and no horizontal sum remains.
//
// Q4_1 (groups of 32): y[m, n] = sum_g d[n, g] (u[n, g] . x[m, g]) + m[n, g] X[m, g] (+ bias[n]), X[m, g] = the fp32
// sum of x's group. Layout (panel_linear.pack_q4_1, a second copy of the codes made at load): per panel of 16 weight
// rows nb and group g, 256 bytes: byte 32 j + 2 i + e holds, for row 16 nb + i, column 32 g + 4 j + e in its low
// nibble and column 32 g + 4 j + 2 + e in its high nibble (j = 0..7, e = 0..1). One vpmovzxbw of 32 bytes gives 32
// words; vpermw through a table of the bf16 values 0..15 (duplicated: it reads index bits 0-4) turns the low nibbles
// into the pair vector of columns 4j, 4j + 1 and, after a shift by 4, the high ones into that of 4j + 2, 4j + 3.
// Beside the codes, per panel and group, the float16 d of the 16 rows then their m (GGUF's own values, widened
// exactly). Per output: for each group in ascending order the 16 pair products go into a fresh fp32 lane by vdpbf16ps
// (codes 0..15 are exact in bf16, so each product is exact), the lane is added as acc = fma(lane, d, acc), then
// acc = fma(m, X_g, acc); bias last, one rounding to bf16.
//
// int8 (per output channel, symmetric, the codes' own [N, K] layout): each panel is widened to bf16 pairs in a
// per-thread scratch once per block of rows of x (int8 is exact in bf16; a 16 x 16 transpose per 32 columns), and
// every pass of x runs on it. y = round_bf16(q . x) * s (+ bias), rounded to bf16: the epilogue of int_gemv.cpp's int8
// kernel and of the layer's bf16 GEMM on the codes.
//
// Each output is one fixed-order sum that depends on neither M, the pass a row falls in, nor the thread count:
// deterministic and batch-invariant. The GIL is released by the bindings.
#include "kiln_torch.h"

#include "kiln_bf16.h"

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>

namespace {

#define KILN_UNROLL _Pragma("GCC unroll 16")
#define KILN_INLINE inline __attribute__((always_inline))
#define KILN_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

constexpr int kPanel = 16;  // weight rows per panel (fp32 lanes)
constexpr int kMaxMB = 12;  // rows of x per pass: 2 x 12 accumulators + the decode's registers
// Prompt-sized x goes in blocks of this many rows: each panel is then read (Q4_1) or widened (int8) once per block,
// while the block of x (48 x 1536 bf16 = 144 KiB) stays in L2; a whole 512-row x streamed from L3 for every panel
// cost a third more.
constexpr int64_t kBlockRows = 4 * kMaxMB;

constexpr int kGroup = 32;                       // Q4_1
constexpr int kCodeBytes = kPanel * kGroup / 2;  // Q4_1: 256 per panel and group

// What both kernels take and give: x [M, K] bf16 contiguous, y [M, N] bf16, bias fp32 [N] or null.
struct Call {
  at::Tensor x, y, bias, x_in;
  int64_t M, N, K;
};

static Call begin(const at::Tensor& x_in, int64_t N, int64_t K, const c10::optional<at::Tensor>& bias_in,
                  const char* name) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kBFloat16 && x_in.dim() >= 1, name,
              ": x must be a bfloat16 CPU tensor [..., K]");
  TORCH_CHECK(x_in.size(-1) == K, name, ": x must be [..., K] with K = ", K);
  Call c;
  if (bias_in.has_value() && bias_in->defined()) {
    TORCH_CHECK(bias_in->device().is_cpu() && bias_in->numel() == N && at::isFloatingType(bias_in->scalar_type()),
                name, ": bias must be a float CPU tensor with N elements");
    c.bias = bias_in->to(at::kFloat).contiguous();
  }
  c.M = 1;
  for (int64_t i = 0; i + 1 < x_in.dim(); ++i) c.M *= x_in.size(i);
  c.N = N, c.K = K, c.x_in = x_in;
  c.x = x_in.reshape({c.M, K}).contiguous();
  c.y = at::empty({c.M, N}, c.x.options());
  return c;
}

static at::Tensor finish(const Call& c) {
  auto sizes = c.x_in.sizes().vec();
  sizes.back() = c.N;
  return c.y.view(sizes);
}

// Panels [nb0, nb1) of thread t of T: contiguous, as even as whole panels allow.
#define KILN_PARALLEL_PANELS(NB, ...)                                           \
  {                                                                             \
    const int nt_ = std::max(1, std::min<int>(at::get_num_threads(), (int)(NB))); \
    _Pragma("omp parallel num_threads(nt_)") {                                  \
      const int t_ = omp_get_thread_num(), T_ = omp_get_num_threads();          \
      const int64_t nb0 = (NB) * t_ / T_, nb1 = (NB) * (t_ + 1) / T_;           \
      __VA_ARGS__;                                                              \
    }                                                                           \
  }

// One bf16 output row of 16 columns from 16 fp32 sums.
KILN_AVX512_BF16 static KILN_INLINE void store16(uint16_t* y, __m512 v) {
  _mm256_storeu_si256((__m256i*)y, _mm512_cvtepi32_epi16(kiln::to_bf16_bits(v)));
}

// ------------------------------------------------------------------------------------------------
// Q4_1
// ------------------------------------------------------------------------------------------------

struct Q4Panels {
  const uint8_t* codes;  // [N / 16, G, 256]
  const uint16_t* dm;    // float16 [N / 16, G, 2, 16]: d of the 16 rows, then m
  int64_t G;
};

// Rows m0 .. m0 + MB - 1 of x (bf16, row stride K) against panel nb; xs: their group sums [MB, G]; y row stride N.
template <int MB>
KILN_AVX512_BF16 static inline void q4_pass(const Q4Panels& P, int64_t nb, const uint16_t* __restrict x, int64_t K,
                                            const float* __restrict xs, const float* __restrict bias,
                                            uint16_t* __restrict y, int64_t N) {
  // bf16 0..15 in both 256-bit halves: vpermw reads bits 0-4 of each index, bit 4 being the other nibble's
  const __m512i utab = _mm512_set_epi16(
      0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40e0, 0x40c0, 0x40a0, 0x4080, 0x4040, 0x4000,
      0x3f80, 0x0000, 0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40e0, 0x40c0, 0x40a0, 0x4080,
      0x4040, 0x4000, 0x3f80, 0x0000);
  __m512 acc[MB];
  KILN_UNROLL
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  const uint8_t* cp = P.codes + nb * P.G * kCodeBytes;
  const uint16_t* dmp = P.dm + nb * P.G * 2 * kPanel;
  for (int64_t g = 0; g < P.G; ++g, cp += kCodeBytes, dmp += 2 * kPanel) {
    __m512 lane[MB];
    KILN_UNROLL
    for (int m = 0; m < MB; ++m) lane[m] = _mm512_setzero_ps();
    const uint16_t* xg = x + g * kGroup;
    KILN_UNROLL
    for (int j = 0; j < 8; ++j) {
      const __m512i words = _mm512_cvtepu8_epi16(_mm256_load_si256((const __m256i*)(cp + 32 * j)));
      const __m512i lo = _mm512_permutexvar_epi16(words, utab);
      const __m512i hi = _mm512_permutexvar_epi16(_mm512_srli_epi16(words, 4), utab);
      KILN_UNROLL
      for (int m = 0; m < MB; ++m) {
        const uint16_t* xp = xg + m * K + 4 * j;
        lane[m] = _mm512_dpbf16_ps(lane[m], (__m512bh)lo, (__m512bh)_mm512_set1_epi32(*(const int32_t*)xp));
        lane[m] = _mm512_dpbf16_ps(lane[m], (__m512bh)hi, (__m512bh)_mm512_set1_epi32(*(const int32_t*)(xp + 2)));
      }
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_load_si256((const __m256i*)dmp));
    const __m512 mv = _mm512_cvtph_ps(_mm256_load_si256((const __m256i*)(dmp + kPanel)));
    KILN_UNROLL
    for (int m = 0; m < MB; ++m) {
      acc[m] = _mm512_fmadd_ps(lane[m], d, acc[m]);
      acc[m] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xs[m * P.G + g]), acc[m]);
    }
  }
  const __m512 b = bias ? _mm512_loadu_ps(bias + nb * kPanel) : _mm512_setzero_ps();
  KILN_UNROLL
  for (int m = 0; m < MB; ++m) store16(y + m * N + nb * kPanel, bias ? _mm512_add_ps(acc[m], b) : acc[m]);
}

// x's 32-value groups summed in fp32 (bf16 is exact in fp32; the order is fixed, so a row's sums do not depend on M).
KILN_AVX512_BF16 static void group_sums(const uint16_t* x, int64_t G, float* out) {
  for (int64_t g = 0; g < G; ++g)
    out[g] = _mm512_reduce_add_ps(_mm512_add_ps(kiln::widen16(x + g * kGroup), kiln::widen16(x + g * kGroup + 16)));
}

// int8: rows m0 .. m0 + MB - 1 of x against a panel widened to bf16 pairs (w: K / 2 vectors of 16 rows x 2 columns).
template <int MB>
KILN_AVX512_BF16 static inline void i8_pass(const uint16_t* __restrict w, const uint16_t* __restrict x, int64_t K,
                                            const float* __restrict sc, const float* __restrict bias,
                                            uint16_t* __restrict y, int64_t N) {
  __m512 acc[MB];
  KILN_UNROLL
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t p = 0; p < K / 2; ++p) {
    const __m512i wv = _mm512_load_si512((const void*)(w + 32 * p));
    KILN_UNROLL
    for (int m = 0; m < MB; ++m)
      acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)wv, (__m512bh)_mm512_set1_epi32(*(const int32_t*)(x + m * K + 2 * p)));
  }
  const __m512 s = _mm512_loadu_ps(sc);
  const __m512 b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  KILN_UNROLL
  for (int m = 0; m < MB; ++m) {
    const __m512 v = _mm512_mul_ps(kiln::round_bf16(acc[m]), s);
    store16(y + m * N, bias ? _mm512_add_ps(v, b) : v);
  }
}

// 32 int8 codes -> 32 bf16 (exact) in order.
KILN_AVX512_BF16 static KILN_INLINE __m512i widen32(const int8_t* p) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + 16))));
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

// r[i] = 16 dwords of row i -> r[c] = dword c of rows 0..15.
KILN_AVX512_BF16 static KILN_INLINE void transpose16(__m512i r[16]) {
  __m512i t[16];
  KILN_UNROLL
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  KILN_UNROLL
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  KILN_UNROLL
  for (int h = 0; h < 2; ++h)
    KILN_UNROLL
    for (int i = 0; i < 4; ++i) {
      t[8 * h + i] = _mm512_shuffle_i32x4(r[8 * h + i], r[8 * h + 4 + i], 0x88);
      t[8 * h + 4 + i] = _mm512_shuffle_i32x4(r[8 * h + i], r[8 * h + 4 + i], 0xdd);
    }
  KILN_UNROLL
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xdd);
  }
}

// Rows 16 nb .. 16 nb + 15 of q [N, K] -> w: for each column pair p, 16 rows x (columns 2p, 2p + 1) in bf16.
KILN_AVX512_BF16 static void widen_panel(const int8_t* q, int64_t K, int64_t nb, uint16_t* w) {
  for (int64_t k0 = 0; k0 < K; k0 += 32) {
    __m512i r[16];
    KILN_UNROLL
    for (int i = 0; i < 16; ++i) r[i] = widen32(q + (nb * kPanel + i) * K + k0);
    transpose16(r);
    KILN_UNROLL
    for (int c = 0; c < 16; ++c) _mm512_store_si512((void*)(w + (k0 + 2 * c) * kPanel), r[c]);
  }
}

#define KILN_MB_SWITCH(mb, FN, ...)          \
  switch (mb) {                              \
    case 1: FN<1>(__VA_ARGS__); break;       \
    case 2: FN<2>(__VA_ARGS__); break;       \
    case 3: FN<3>(__VA_ARGS__); break;       \
    case 4: FN<4>(__VA_ARGS__); break;       \
    case 5: FN<5>(__VA_ARGS__); break;       \
    case 6: FN<6>(__VA_ARGS__); break;       \
    case 7: FN<7>(__VA_ARGS__); break;       \
    case 8: FN<8>(__VA_ARGS__); break;       \
    case 9: FN<9>(__VA_ARGS__); break;       \
    case 10: FN<10>(__VA_ARGS__); break;     \
    case 11: FN<11>(__VA_ARGS__); break;     \
    default: FN<12>(__VA_ARGS__); break;     \
  }

at::Tensor q4_1_linear(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& dm,
                       const c10::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kByte && codes.dim() == 3 &&
                  codes.size(2) == kCodeBytes && codes.is_contiguous(),
              "q4_1_linear: codes must be contiguous uint8 [N / 16, K / 32, 256] (panel_linear.pack_q4_1)");
  const int64_t NB = codes.size(0), G = codes.size(1);
  TORCH_CHECK(dm.device().is_cpu() && dm.scalar_type() == at::kHalf && dm.is_contiguous() && dm.dim() == 4 &&
                  dm.size(0) == NB && dm.size(1) == G && dm.size(2) == 2 && dm.size(3) == kPanel,
              "q4_1_linear: dm must be contiguous float16 [N / 16, K / 32, 2, 16] (panel_linear.pack_q4_1)");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(codes.data_ptr()) % 32 == 0 &&
                  reinterpret_cast<uintptr_t>(dm.data_ptr()) % 32 == 0,
              "q4_1_linear: codes and dm must be 32-byte aligned");
  Call c = begin(x_in, NB * kPanel, G * kGroup, bias_in, "q4_1_linear");
  const int64_t M = c.M, N = c.N, K = c.K;
  if (M == 0 || N == 0) return finish(c);
  at::Tensor sums = at::empty({M, G}, c.x.options().dtype(at::kFloat));
  float* xs = sums.data_ptr<float>();
  const Q4Panels P{codes.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(dm.data_ptr<at::Half>()), G};
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(c.x.data_ptr<at::BFloat16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(c.y.data_ptr<at::BFloat16>());
  const float* bp = c.bias.defined() ? c.bias.data_ptr<float>() : nullptr;
  KILN_PARALLEL_PANELS(NB, {
    // X[m, g] for the m terms, rows shared out among the threads (a prompt's sums, done by one thread, had cost
    // ~20% of a call), each sum in one fixed order: the two 16-value halves added lane by lane, then reduced
    _Pragma("omp for schedule(static)") for (int64_t m = 0; m < M; ++m) group_sums(xp + m * K, G, xs + m * G);
    for (int64_t b0 = 0; b0 < M; b0 += kBlockRows)
      for (int64_t nb = nb0; nb < nb1; ++nb)
        for (int64_t m0 = b0; m0 < std::min(M, b0 + kBlockRows); m0 += kMaxMB)
          KILN_MB_SWITCH(std::min<int64_t>(kMaxMB, M - m0), q4_pass, P, nb, xp + m0 * K, K, xs + m0 * G, bp,
                         yp + m0 * N, N)
  });
  return finish(c);
}

at::Tensor int8_linear(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(qweight.device().is_cpu() && qweight.scalar_type() == at::kChar && qweight.dim() == 2 &&
                  qweight.is_contiguous() && qweight.size(0) % kPanel == 0 && qweight.size(1) % 32 == 0,
              "int8_linear: qweight must be contiguous int8 [N, K], N a multiple of 16 and K of 32");
  const int64_t NB = qweight.size(0) / kPanel;
  TORCH_CHECK(scales.device().is_cpu() && scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  scales.numel() == qweight.size(0),
              "int8_linear: scales must be contiguous float32 [N]");
  Call c = begin(x_in, qweight.size(0), qweight.size(1), bias_in, "int8_linear");
  const int64_t M = c.M, N = c.N, K = c.K;
  if (M == 0 || N == 0) return finish(c);
  const int8_t* q = qweight.data_ptr<int8_t>();
  const float* sc = scales.data_ptr<float>();
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(c.x.data_ptr<at::BFloat16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(c.y.data_ptr<at::BFloat16>());
  const float* bp = c.bias.defined() ? c.bias.data_ptr<float>() : nullptr;
  KILN_PARALLEL_PANELS(NB, {
    // the thread's widened panel: 16 x K bf16
    std::unique_ptr<uint16_t, decltype(&std::free)> scratch(
        static_cast<uint16_t*>(std::aligned_alloc(64, kPanel * K * sizeof(uint16_t))), &std::free);
    uint16_t* w = scratch.get();
    for (int64_t b0 = 0; b0 < M; b0 += 2 * kBlockRows)
      for (int64_t nb = nb0; nb < nb1; ++nb) {
        widen_panel(q, K, nb, w);
        for (int64_t m0 = b0; m0 < std::min(M, b0 + 2 * kBlockRows); m0 += kMaxMB)
          KILN_MB_SWITCH(std::min<int64_t>(kMaxMB, M - m0), i8_pass, w, xp + m0 * K, K, sc + nb * kPanel,
                         bp ? bp + nb * kPanel : nullptr, yp + m0 * N + nb * kPanel, N)
      }
  });
  return finish(c);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q4_1_linear", &q4_1_linear,
        "y = x @ (d * u + m)^T (+ bias): GGUF Q4_1 codes in 16-row panels, bf16 x, unrounded weights", py::arg("x"),
        py::arg("codes"), py::arg("dm"), py::arg("bias") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("int8_linear", &int8_linear, "y = x @ (q * s[:, None])^T (+ bias): int8 codes widened to 16-row bf16 panels",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("bias") = py::none(),
        py::call_guard<py::gil_scoped_release>());
}
