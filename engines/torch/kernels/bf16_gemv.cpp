// Skinny bf16 GEMM for decode: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), M small (1..16).
//
// Why: at M=1..8 the step is bound by streaming W from memory, and F.linear's bf16 path reaches
// only ~1/3 of the machine's read bandwidth. This kernel reads each weight byte exactly once per
// call, in address order, and does all M rows of x against it while it is in registers.
//
// How:
//  - W stays in its natural [N, K] row-major layout (no pre-packing). vdpbf16ps multiplies
//    *adjacent pairs* of bf16 and adds both products into one fp32 lane, so a 64-byte line of a
//    W row (32 bf16) against the matching 32 bf16 of an x row is one instruction, and x's natural
//    layout already is the pair layout: no conversion of x is needed.
//  - A tile is R consecutive W rows x MB rows of x: MB*R fp32 accumulators of 16 lanes, reduced
//    horizontally once per tile at the end of K. Several rows at once give independent dependency
//    chains (the instruction's latency is hidden) and several concurrent memory streams.
//  - Each thread (OpenMP, torch's thread count) owns one contiguous range of rows, so it streams
//    one contiguous slice of W; the hardware prefetcher sees one long sequential read, helped by a
//    software prefetch some bytes ahead.
//  - K tails (K % 32 != 0) use masked loads, which zero the missing elements of both operands.
//  - The GIL is released by the binding (kiln calls this from a background thread).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace {

using bf16 = uint16_t;

constexpr int kMaxMB = 8;  // rows of x per pass; more passes re-read the tile's W rows from L1

static int64_t g_prefetch_bytes = 1024;  // distance ahead along the stream (tunable for benchmarks)

static inline __m512bh load_bf16x32(const bf16* p) {
  return (__m512bh)_mm512_loadu_si512(p);
}
static inline __m512bh load_bf16x32(const bf16* p, __mmask32 m) {
  return (__m512bh)_mm512_maskz_loadu_epi16(m, p);
}

// out[m * ldo + r] = dot(x[m, :K], w[r, :K]) for r < R, m < MB, in fp32.
template <int MB, int R>
static inline void dot_tile(const bf16* __restrict w, const bf16* __restrict x, int64_t K,
                            int64_t pf, float* __restrict out, int64_t ldo) {
  __m512 acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();

  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) {
      if (pf) _mm_prefetch((const char*)(w + r * K + k) + pf, _MM_HINT_T0);
      wv[r] = load_bf16x32(w + r * K + k);
    }
    for (int m = 0; m < MB; ++m) {
      const __m512bh xv = load_bf16x32(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
    }
  }
  if (k < K) {  // tail: masked loads zero the lanes past K in both operands
    const __mmask32 mask = (__mmask32)((1ull << (K - k)) - 1);
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load_bf16x32(w + r * K + k, mask);
    for (int m = 0; m < MB; ++m) {
      const __m512bh xv = load_bf16x32(x + m * K + k, mask);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) out[m * ldo + r] = _mm512_reduce_add_ps(acc[m][r]);
}

// Rows [n0, n1) of W against MB rows of x; fp32 results into out[m * N + n].
template <int MB, int R>
static void rows_kernel(const bf16* w, const bf16* x, int64_t K, int64_t N, int64_t n0, int64_t n1,
                        float* out) {
  const int64_t pf = g_prefetch_bytes;
  int64_t n = n0;
  for (; n + R <= n1; n += R) dot_tile<MB, R>(w + n * K, x, K, pf, out + n, N);
  for (; n < n1; ++n) dot_tile<MB, 1>(w + n * K, x, K, pf, out + n, N);
}

// Register budget (32 zmm): MB*R accumulators + R weight vectors + 1 x vector.
template <int MB>
static void rows_dispatch(const bf16* w, const bf16* x, int64_t K, int64_t N, int64_t n0, int64_t n1,
                          float* out) {
  constexpr int R = MB <= 1 ? 8 : MB <= 2 ? 8 : MB <= 4 ? 4 : 2;
  rows_kernel<MB, R>(w, x, K, N, n0, n1, out);
}

static void rows_any_m(const bf16* w, const bf16* x, int64_t M, int64_t K, int64_t N, int64_t n0,
                       int64_t n1, float* out) {
  // Sub-blocks of rows small enough that a second pass over x (M > 8) finds them in L1.
  const int64_t step = M <= kMaxMB ? (n1 - n0) : std::max<int64_t>(8, (16 * 1024) / (2 * K) / 8 * 8);
  for (int64_t b0 = n0; b0 < n1; b0 += step) {
    const int64_t b1 = std::min(n1, b0 + step);
    for (int64_t m0 = 0; m0 < M; m0 += kMaxMB) {
      const bf16* xm = x + m0 * K;
      float* om = out + m0 * N;
      switch (std::min<int64_t>(kMaxMB, M - m0)) {
        case 1: rows_dispatch<1>(w, xm, K, N, b0, b1, om); break;
        case 2: rows_dispatch<2>(w, xm, K, N, b0, b1, om); break;
        case 3: rows_dispatch<3>(w, xm, K, N, b0, b1, om); break;
        case 4: rows_dispatch<4>(w, xm, K, N, b0, b1, om); break;
        case 5: rows_dispatch<5>(w, xm, K, N, b0, b1, om); break;
        case 6: rows_dispatch<6>(w, xm, K, N, b0, b1, om); break;
        case 7: rows_dispatch<7>(w, xm, K, N, b0, b1, om); break;
        default: rows_dispatch<8>(w, xm, K, N, b0, b1, om); break;
      }
    }
  }
}

at::Tensor bf16_linear(const at::Tensor& x_in, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(x_in.device().is_cpu() && weight.device().is_cpu(), "bf16_linear: CPU tensors only");
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "bf16_linear: x and weight must be bfloat16");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "bf16_linear: weight must be contiguous [N, K]");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == K, "bf16_linear: x must be [..., K] with K = weight.size(1)");

  const at::Tensor x = x_in.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  auto out_sizes = x_in.sizes().vec();
  out_sizes.back() = N;

  // fp32 staging: MB*R results land per tile; bias is added and rounded (RNE) to bf16 after.
  at::Tensor acc = at::empty({M, N}, x.options().dtype(at::kFloat));
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    TORCH_CHECK(bias_in->numel() == N, "bf16_linear: bias must have N elements");
    bias = bias_in->to(at::kFloat).contiguous();
  }
  at::Tensor y = at::empty({M, N}, x.options());

  const bf16* wp = reinterpret_cast<const bf16*>(weight.data_ptr<at::BFloat16>());
  const bf16* xp = reinterpret_cast<const bf16*>(x.data_ptr<at::BFloat16>());
  float* ap = acc.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();

  if (M > 0 && N > 0) {
    // Tiny problems are not worth waking a second thread.
    const int nt = (N * K < 16384 || N < 16) ? 1 : std::max(1, at::get_num_threads());
#pragma omp parallel num_threads(nt)
    {
      const int t = omp_get_thread_num(), T = omp_get_num_threads();
      // Contiguous row ranges, boundaries on multiples of 8 rows (whole tiles for every R).
      const int64_t per = (N / T) / 8 * 8;
      const int64_t n0 = t * per, n1 = (t == T - 1) ? N : n0 + per;
      rows_any_m(wp, xp, M, K, N, n0, n1, ap);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n0; n < n1; ++n) {
          const float v = ap[m * N + n] + (bp ? bp[n] : 0.f);
          yp[m * N + n] = at::BFloat16(v);  // round-to-nearest-even, like F.linear
        }
    }
  }
  return y.view(out_sizes);
}

void set_prefetch_bytes(int64_t b) { g_prefetch_bytes = b; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_linear", &bf16_linear, "y = x @ W^T (+ bias), bf16 in/out, fp32 accumulation",
        py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("set_prefetch_bytes", &set_prefetch_bytes, "software prefetch distance (0 = off); for tuning");
}
