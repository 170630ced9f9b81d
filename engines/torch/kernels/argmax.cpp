// Row-wise argmax of float32 logits [R, V] -> int64 [R], torch.argmax's answer: the first index of the
// maximum, or of the first NaN when a row has one.
// Why: torch's CPU argmax over a large vocabulary is a visible share of a batch-32 decode step
// (docs/performance.md); a max pass and a find-first pass with AVX-512 read each row twice from L2.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>

namespace {

int64_t argmax_portable(const float* x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return i;
    if (x[i] > x[best]) best = i;
  }
  return best;
}

__attribute__((target("avx512f"))) int64_t argmax_avx512(const float* x, int64_t n) {
  __m512 mv = _mm512_set1_ps(-INFINITY);
  __mmask16 nan = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    mv = _mm512_max_ps(mv, v);
  }
  float m = _mm512_reduce_max_ps(mv);
  for (int64_t j = i; j < n; ++j) {
    if (std::isnan(x[j])) nan = 1;
    m = x[j] > m ? x[j] : m;
  }
  if (nan) return argmax_portable(x, n);  // first NaN, as torch
  const __m512 target = _mm512_set1_ps(m);
  for (i = 0; i + 16 <= n; i += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), target, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
  for (; i < n; ++i)
    if (x[i] == m) return i;
  return 0;  // not reached: m is one of the elements
}

torch::Tensor argmax_rows(torch::Tensor x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.size(1) > 0,
              "x must be a non-empty float32 CPU matrix");
  x = x.contiguous();
  const int64_t R = x.size(0), V = x.size(1);
  auto out = torch::empty({R}, torch::kInt64);
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  static const bool vector = __builtin_cpu_supports("avx512f");
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      op[r] = vector ? argmax_avx512(xp + r * V, V) : argmax_portable(xp + r * V, V);
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("argmax_rows", &argmax_rows, "torch.argmax(x, dim=-1) for float32 CPU rows", py::arg("x"),
        py::call_guard<py::gil_scoped_release>());
}
