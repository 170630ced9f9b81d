// Row-wise argmax of float32 logits [R, V] -> int64 [R], torch.argmax's answer: the first index of the
// maximum, or of the first NaN when a row has one.
// Why: torch's CPU argmax over a large vocabulary is a visible share of a batch-32 decode step
// (docs/performance.md); a max pass and a find-first pass in vectors read each row twice from L2. One source
// for every ISA level: kiln_simd.h, compiled per level by isa_variants.py.
#include "kiln_torch.h"

#include "kiln_simd.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

namespace {

namespace simd = kiln::simd;
using simd::F;
using simd::W;

int64_t argmax_portable(const float* x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return i;
    if (x[i] > x[best]) best = i;
  }
  return best;
}

int64_t argmax_simd(const float* x, int64_t n) {
  F mv = simd::set1(-INFINITY);
  uint32_t nan = 0;
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const F v = simd::load(x + i);
    nan |= simd::nan_lanes(v);
    mv = simd::max(mv, v);
  }
  float m = simd::reduce_max(mv);
  for (int64_t j = i; j < n; ++j) {
    if (std::isnan(x[j])) nan = 1;
    m = x[j] > m ? x[j] : m;
  }
  if (nan) return argmax_portable(x, n);  // first NaN, as torch
  const F target = simd::set1(m);
  for (i = 0; i + W <= n; i += W) {
    const uint32_t hit = simd::equal_lanes(simd::load(x + i), target);
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
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      op[r] = argmax_simd(xp + r * V, V);
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("argmax_rows", &argmax_rows, "torch.argmax(x, dim=-1) for float32 CPU rows", py::arg("x"),
        py::call_guard<py::gil_scoped_release>());
}
