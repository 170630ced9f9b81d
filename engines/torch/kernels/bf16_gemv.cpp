// Skinny bf16 GEMM for decode: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), M small (1..8).
//
// Why: at M = 1..8 a linear layer is bound by streaming W from memory, and F.linear's bf16 path
// reaches well under half the machine's read bandwidth there. This kernel reads each weight byte
// once per call, in address order, and applies all M rows of x to it while it is in registers.
//
// How:
//  - W keeps its natural [N, K] row-major layout (no pre-packing). vdpbf16ps multiplies adjacent
//    *pairs* of bf16 and adds both products into one fp32 lane, so one 64-byte line of a W row
//    (32 bf16) against the matching 32 bf16 of an x row is one instruction, and x's natural layout
//    already is the pair layout: x needs no conversion.
//  - A tile is R = 16 / MB consecutive W rows x MB rows of x: up to 16 fp32 accumulators, R rows
//    sharing each x load, 12-16 independent chains hiding the instruction's latency. At the end of
//    K the accumulators are reduced together (hsum16), far cheaper than one reduction each -- that
//    matters at M = 4..8, where the kernel is close to compute bound on 2 cores (-15..25% time).
//  - Each thread (OpenMP, torch.get_num_threads()) owns one contiguous range of rows, i.e. one
//    contiguous slice of W. A software prefetch kPrefetch bytes ahead in every row of the tile
//    keeps enough misses in flight (with the hardware prefetcher alone, cold-weight bandwidth was
//    ~15% lower at M = 1 and ~45% lower at M = 4..8).
//  - K tails (K % 32 != 0) use masked loads, which zero the missing elements of both operands.
//  - Every output element is one accumulator summed in a fixed order, whatever M, the tile slot or
//    the thread count: results are deterministic and batch-invariant.
//  - The GIL is released by the binding (kiln calls this from a background thread).
#include "kiln_torch.h"

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace {

using bf16 = uint16_t;

constexpr int kMaxMB = 8;             // rows of x per pass over a block of W rows
constexpr int64_t kPrefetch = 16384;  // bytes ahead; 4-32 KB measured within noise, 0 much worse

static inline __m512bh load_bf16x32(const bf16* p) {
  return (__m512bh)_mm512_loadu_si512(p);
}
static inline __m512bh load_bf16x32(const bf16* p, __mmask32 m) {
  return (__m512bh)_mm512_maskz_loadu_epi16(m, p);
}

// Lane i of the result = sum of the 16 lanes of v[i], for 16 vectors at once: 15 shuffle pairs
// and adds instead of 16 separate reductions. Each level packs two vectors into one and halves
// the lanes left per vector; the packing leaves them in lane order [0,2,1,3, 8,10,9,11, 4,6,5,7,
// 12,14,13,15] (an involution), so the inputs are taken in that order to come out in order.
static inline __m512 hsum16(const __m512 v[16]) {
  constexpr int P[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i) {  // 256-bit halves
    const __m512 x = v[P[i]], y = v[P[i + 8]];
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
  }
  for (int i = 0; i < 4; ++i)  // 128-bit quarters
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 4], 0x88), _mm512_shuffle_f32x4(a[i], a[i + 4], 0xDD));
  for (int i = 0; i < 2; ++i)  // pairs of lanes within each quarter
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[i], b[i + 2], 0x44), _mm512_shuffle_ps(b[i], b[i + 2], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
}

// y[m * ldy + r] = bf16(dot(x[m, :K], w[r, :K]) + bias[r]) for r < R, m < MB.
// Prefetches stop at pf_end (the end of this thread's rows).
template <int MB, int R>
static inline void dot_tile(const bf16* __restrict w, const bf16* __restrict x, int64_t K,
                            const char* pf_end, const at::BFloat16* __restrict bias,
                            at::BFloat16* __restrict y, int64_t ldy) {
  static_assert(MB * R <= 16, "one hsum16 per tile");
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();  // unused ones stay zero for hsum16

  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) {
      const char* pf = (const char*)(w + r * K + k) + kPrefetch;
      if (pf < pf_end) _mm_prefetch(pf, _MM_HINT_T0);
      wv[r] = load_bf16x32(w + r * K + k);
    }
    for (int m = 0; m < MB; ++m) {
      const __m512bh xv = load_bf16x32(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[m * R + r] = _mm512_dpbf16_ps(acc[m * R + r], xv, wv[r]);
    }
  }
  if (k < K) {  // tail: masked loads zero the lanes past K in both operands
    const __mmask32 mask = (__mmask32)((1ull << (K - k)) - 1);
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load_bf16x32(w + r * K + k, mask);
    for (int m = 0; m < MB; ++m) {
      const __m512bh xv = load_bf16x32(x + m * K + k, mask);
      for (int r = 0; r < R; ++r) acc[m * R + r] = _mm512_dpbf16_ps(acc[m * R + r], xv, wv[r]);
    }
  }
  alignas(64) float s[16];
  _mm512_store_ps(s, hsum16(acc));
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r)  // bias added in fp32, one rounding to bf16 (RNE), like F.linear
      y[m * ldy + r] = at::BFloat16(s[m * R + r] + (bias ? float(bias[r]) : 0.f));
}

// Rows [n0, n1) of W against MB rows of x.
template <int MB>
static void rows_kernel(const bf16* w, const bf16* x, int64_t K, int64_t N, int64_t n0, int64_t n1,
                        const char* pf_end, const at::BFloat16* bias, at::BFloat16* y) {
  constexpr int R = 16 / MB;  // registers: 16 accumulators + R weight vectors + 1 x vector
  int64_t n = n0;
  for (; n + R <= n1; n += R) dot_tile<MB, R>(w + n * K, x, K, pf_end, bias ? bias + n : nullptr, y + n, N);
  for (; n < n1; ++n) dot_tile<MB, 1>(w + n * K, x, K, pf_end, bias ? bias + n : nullptr, y + n, N);
}

// Rows [n0, n1) of W against all M rows of x, in passes of up to kMaxMB rows of x. For M > 8 the
// rows go in blocks of ~16 KB so that the passes after the first find them in L1 (F.linear is
// faster there anyway; this keeps any M correct).
static void rows_any_m(const bf16* w, const bf16* x, int64_t M, int64_t K, int64_t N, int64_t n0,
                       int64_t n1, const at::BFloat16* bias, at::BFloat16* y) {
  const char* pf_end = (const char*)(w + n1 * K);
  const int64_t step = M <= kMaxMB ? (n1 - n0) : std::max<int64_t>(16, 16384 / (2 * K) / 16 * 16);
  for (int64_t b0 = n0; b0 < n1; b0 += step) {
    const int64_t b1 = std::min(n1, b0 + step);
    for (int64_t m0 = 0; m0 < M; m0 += kMaxMB) {
      const bf16* xm = x + m0 * K;
      at::BFloat16* ym = y + m0 * N;
      switch (std::min<int64_t>(kMaxMB, M - m0)) {
        case 1: rows_kernel<1>(w, xm, K, N, b0, b1, pf_end, bias, ym); break;
        case 2: rows_kernel<2>(w, xm, K, N, b0, b1, pf_end, bias, ym); break;
        case 3: rows_kernel<3>(w, xm, K, N, b0, b1, pf_end, bias, ym); break;
        case 4: rows_kernel<4>(w, xm, K, N, b0, b1, pf_end, bias, ym); break;
        case 5: rows_kernel<5>(w, xm, K, N, b0, b1, pf_end, bias, ym); break;
        case 6: rows_kernel<6>(w, xm, K, N, b0, b1, pf_end, bias, ym); break;
        case 7: rows_kernel<7>(w, xm, K, N, b0, b1, pf_end, bias, ym); break;
        default: rows_kernel<8>(w, xm, K, N, b0, b1, pf_end, bias, ym); break;
      }
    }
  }
}

at::Tensor bf16_linear(const at::Tensor& x_in, const at::Tensor& weight_in,
                       const c10::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(x_in.device().is_cpu() && weight_in.device().is_cpu(), "bf16_linear: CPU tensors only");
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && weight_in.scalar_type() == at::kBFloat16,
              "bf16_linear: x and weight must be bfloat16");
  TORCH_CHECK(weight_in.dim() == 2, "bf16_linear: weight must be [N, K]");
  const int64_t N = weight_in.size(0), K = weight_in.size(1);
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == K, "bf16_linear: x must be [..., K] with K = weight.size(1)");
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  if (has_bias)
    TORCH_CHECK(bias_in->scalar_type() == at::kBFloat16 && bias_in->numel() == N,
                "bf16_linear: bias must be bfloat16 with N elements");

  // Common case (2-D contiguous x and W) without extra views: this runs ~120 times per step.
  const bool flat = x_in.dim() == 2;
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x_in.dim(); ++d) M *= x_in.size(d);
  const at::Tensor x = flat ? x_in.contiguous() : x_in.reshape({M, K}).contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();

  at::Tensor y = at::empty({M, N}, x.options());
  if (M > 0 && N > 0) {
    if (K == 0) {
      has_bias ? y.copy_(bias.view({1, N}).expand({M, N})) : y.zero_();
    } else {
      const bf16* wp = reinterpret_cast<const bf16*>(weight.data_ptr<at::BFloat16>());
      const bf16* xp = reinterpret_cast<const bf16*>(x.data_ptr<at::BFloat16>());
      const at::BFloat16* bp = has_bias ? bias.data_ptr<at::BFloat16>() : nullptr;
      at::BFloat16* yp = y.data_ptr<at::BFloat16>();
      // Tiny problems are not worth waking a second thread.
      const int nt = (N * K < 32768 || N < 32) ? 1 : std::max(1, at::get_num_threads());
#pragma omp parallel num_threads(nt)
      {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        // Contiguous row ranges; boundaries on multiples of 16 rows, i.e. whole tiles for any MB.
        const int64_t per = (N / T) / 16 * 16;
        const int64_t n0 = t * per, n1 = (t == T - 1) ? N : n0 + per;
        rows_any_m(wp, xp, M, K, N, n0, n1, bp, yp);
      }
    }
  }
  if (flat) return y;
  auto out_sizes = x_in.sizes().vec();
  out_sizes.back() = N;
  return y.view(out_sizes);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_linear", &bf16_linear, "y = x @ W^T (+ bias): bf16 in/out, fp32 accumulation",
        py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(),
        py::call_guard<py::gil_scoped_release>());
}
