// SwiGLU's activation for bf16 rows: y = bf16( bf16(silu(gate)) * up ) with [gate | up] halves of one
// row of the fused gate_up projection, the rounding of `F.silu(gate) * up` in bf16.
// Why: torch runs it as silu and mul over strided halves, a noticeable share of a prefill step
// (docs/performance.md); this is one pass (read the row once, write half of it). One source for every ISA
// level: kiln_simd.h (its exp too), compiled per level by isa_variants.py.
#include <torch/extension.h>

#include "kiln_simd.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

namespace simd = kiln::simd;
using simd::F;
using simd::W;

void silu_mul_row(const uint16_t* g, const uint16_t* u, uint16_t* y, int64_t n) {
  const F one = simd::set1(1.f);
  for (int64_t i = 0; i < n; i += W) {
    const F x = simd::load_bf16(g + i, n - i);
    const F silu = simd::div(x, simd::add(one, simd::exp(simd::sub(simd::zero(), x))));
    simd::store_bf16(y + i, simd::mul(simd::round_bf16(silu), simd::load_bf16(u + i, n - i)), n - i);
  }
}

torch::Tensor silu_mul_bf16(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == torch::kBFloat16 && gate_up.device().is_cpu(), "bf16 CPU tensors only");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up must be [T, 2 * I]");
  auto x = gate_up.contiguous();
  const int64_t rows = x.size(0), n = x.size(1) / 2;
  auto out = torch::empty({rows, n}, x.options());
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint16_t* g = xp + r * 2 * n;
      silu_mul_row(g, g + n, op + r * n, n);
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("silu_mul_bf16", &silu_mul_bf16, "silu(gate) * up of bf16 [T, 2I] rows, F.silu(g) * u rounding",
        py::arg("gate_up"), py::call_guard<py::gil_scoped_release>());
}
