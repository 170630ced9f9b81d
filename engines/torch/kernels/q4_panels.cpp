// Affine int4 (GGUF Q4_1, groups of 32) against bf16 x for steps of many rows, with the unrounded weights:
// y[m, n] = sum_g d[n, g] (u[n, g] . x[m, g]) + m[n, g] X[m, g] (+ bias[n]), X[m, g] = the fp32 sum of x's group.
//
// Why a second layout of the same codes: int_gemv.cpp's kernels keep one weight row's columns in a vector and sum
// its lanes at the end, so every 32 weights of every row cost a decode (a table per group and row, or a d-scaled dot
// per row of x) that a step of 32 rows repeats 32 times over 4 passes; there they ran at under half the machine's
// bf16 dot-product rate. Here a vector holds 16 output columns (16 rows of W) times one pair of inputs, the layout of
// AVX512-BF16's dot product with x's pair broadcast from memory (as oneDNN's brgemm does), so one decoded vector
// serves every row of x in the pass and no horizontal sum remains.
//
// Layout (q4_panels.pack): per panel of 16 weight rows nb and group g, 256 bytes of codes then nothing else:
// byte 32 j + 2 i + e holds, for row 16 nb + i, column 32 g + 4 j + e in its low nibble and column 32 g + 4 j + 2 + e
// in its high nibble (j = 0..7, e = 0..1). One vpmovzxbw of 32 bytes gives 32 words; vpermw through a table of the
// bf16 values 0..15 (duplicated: it reads index bits 0-4) turns the low nibbles into the pair vector of columns
// 4j, 4j + 1 and, after a shift by 4, the high ones into that of 4j + 2, 4j + 3. Beside the codes, per panel and
// group, the float16 d of the 16 rows then their m (GGUF's own values, widened exactly).
//
// Per output: for each group in ascending order the 16 pair products go into a fresh fp32 lane by vdpbf16ps
// (codes 0..15 are exact in bf16, so each product is exact), the lane is added as acc = fma(lane, d, acc), then
// acc = fma(m, X_g, acc); bias last, one rounding to bf16. The order depends on neither M, the pass a row falls in,
// nor the thread count: deterministic and batch-invariant. The GIL is released by the binding.
#include "kiln_torch.h"

#include "kiln_bf16.h"

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace {

#define KILN_UNROLL _Pragma("GCC unroll 16")
#define KILN_INLINE inline __attribute__((always_inline))
#define KILN_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

constexpr int kGroup = 32;
constexpr int kPanel = 16;                      // weight rows per panel (fp32 lanes)
constexpr int kCodeBytes = kPanel * kGroup / 2;  // 256 per panel and group
constexpr int kMaxMB = 12;                       // rows of x per pass: 2 x 12 accumulators + the decode's registers
// Prompt-sized x goes in blocks of this many rows: each panel is then read once per block, while the block of x
// (up to 48 x 1536 bf16 = 144 KiB) stays in L2; a whole 512-row x streamed from L3 for every panel cost a third more.
constexpr int64_t kBlockRows = 4 * kMaxMB;

struct Panels {
  const uint8_t* codes;  // [N / 16, G, 256]
  const uint16_t* dm;    // float16 [N / 16, G, 2, 16]: d of the 16 rows, then m
  int64_t G;
};

// Rows m0 .. m0 + MB - 1 of x (bf16, row stride K) against panel nb; y row stride N.
template <int MB>
KILN_AVX512_BF16 static inline void panel_pass(const Panels& P, int64_t nb, const uint16_t* __restrict x, int64_t K,
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
  for (int m = 0; m < MB; ++m) {
    const __m512 v = bias ? _mm512_add_ps(acc[m], b) : acc[m];
    _mm256_storeu_si256((__m256i*)(y + m * N + nb * kPanel), _mm512_cvtepi32_epi16(kiln::to_bf16_bits(v)));
  }
}

KILN_AVX512_BF16 static void panel_rows(int mb, const Panels& P, int64_t nb, const uint16_t* x, int64_t K,
                                        const float* xs, const float* bias, uint16_t* y, int64_t N) {
  switch (mb) {
    case 1: panel_pass<1>(P, nb, x, K, xs, bias, y, N); break;
    case 2: panel_pass<2>(P, nb, x, K, xs, bias, y, N); break;
    case 3: panel_pass<3>(P, nb, x, K, xs, bias, y, N); break;
    case 4: panel_pass<4>(P, nb, x, K, xs, bias, y, N); break;
    case 5: panel_pass<5>(P, nb, x, K, xs, bias, y, N); break;
    case 6: panel_pass<6>(P, nb, x, K, xs, bias, y, N); break;
    case 7: panel_pass<7>(P, nb, x, K, xs, bias, y, N); break;
    case 8: panel_pass<8>(P, nb, x, K, xs, bias, y, N); break;
    case 9: panel_pass<9>(P, nb, x, K, xs, bias, y, N); break;
    case 10: panel_pass<10>(P, nb, x, K, xs, bias, y, N); break;
    case 11: panel_pass<11>(P, nb, x, K, xs, bias, y, N); break;
    default: panel_pass<12>(P, nb, x, K, xs, bias, y, N); break;
  }
}

at::Tensor q4_panels_linear(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& dm,
                            const c10::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kBFloat16 && x_in.dim() >= 1,
              "q4_panels_linear: x must be a bfloat16 CPU tensor [..., K]");
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kByte && codes.dim() == 3 &&
                  codes.size(2) == kCodeBytes && codes.is_contiguous(),
              "q4_panels_linear: codes must be contiguous uint8 [N / 16, K / 32, 256] (q4_panels.pack)");
  const int64_t NB = codes.size(0), G = codes.size(1), N = NB * kPanel, K = G * kGroup;
  TORCH_CHECK(dm.device().is_cpu() && dm.scalar_type() == at::kHalf && dm.is_contiguous() && dm.dim() == 4 &&
                  dm.size(0) == NB && dm.size(1) == G && dm.size(2) == 2 && dm.size(3) == kPanel,
              "q4_panels_linear: dm must be contiguous float16 [N / 16, K / 32, 2, 16] (q4_panels.pack)");
  TORCH_CHECK(x_in.size(-1) == K, "q4_panels_linear: x must be [..., K] with K = ", K);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(codes.data_ptr()) % 32 == 0 &&
                  reinterpret_cast<uintptr_t>(dm.data_ptr()) % 32 == 0,
              "q4_panels_linear: codes and dm must be 32-byte aligned");
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    TORCH_CHECK(bias_in->device().is_cpu() && bias_in->numel() == N && at::isFloatingType(bias_in->scalar_type()),
                "q4_panels_linear: bias must be a float CPU tensor with N elements");
    bias = bias_in->to(at::kFloat).contiguous();
  }
  int64_t M = 1;
  for (int64_t i = 0; i + 1 < x_in.dim(); ++i) M *= x_in.size(i);
  const at::Tensor x = x_in.reshape({M, K}).contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) {
    auto sizes = x_in.sizes().vec();
    sizes.back() = N;
    return y.view(sizes);
  }
  {
    // X[m, g]: each group's values summed in ascending order in fp32
    at::Tensor sums = at::empty({M, G}, x.options().dtype(at::kFloat));
    float* xs = sums.data_ptr<float>();
    const at::BFloat16* xb = x.data_ptr<at::BFloat16>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < G; ++g) {
        float s = 0.f;
        for (int64_t k = g * kGroup; k < (g + 1) * kGroup; ++k) s += float(xb[m * K + k]);
        xs[m * G + g] = s;
      }
    const Panels P{codes.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(dm.data_ptr<at::Half>()), G};
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
    const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
    const int nt = std::max(1, std::min<int>(at::get_num_threads(), (int)NB));
#pragma omp parallel num_threads(nt)
    {
      const int t = omp_get_thread_num(), T = omp_get_num_threads();
      const int64_t nb0 = NB * t / T, nb1 = NB * (t + 1) / T;
      // blocks of kBlockRows rows of x (in L2) against the thread's panels (L2 after the first block)
      for (int64_t b0 = 0; b0 < M; b0 += kBlockRows)
        for (int64_t nb = nb0; nb < nb1; ++nb)
          for (int64_t m0 = b0; m0 < std::min(M, b0 + kBlockRows); m0 += kMaxMB)
            panel_rows((int)std::min<int64_t>(kMaxMB, M - m0), P, nb, xp + m0 * K, K, xs + m0 * G, bp, yp + m0 * N,
                       N);
    }
  }
  auto sizes = x_in.sizes().vec();
  sizes.back() = N;
  return y.view(sizes);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q4_panels_linear", &q4_panels_linear,
        "y = x @ (d * u + m)^T (+ bias): GGUF Q4_1 codes in 16-row panels, bf16 x, unrounded weights",
        py::arg("x"), py::arg("codes"), py::arg("dm"), py::arg("bias") = py::none(),
        py::call_guard<py::gil_scoped_release>());
}
