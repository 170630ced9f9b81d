// SwiGLU's activation for bf16 or fp32 rows: y = silu(gate) * up with [gate | up] halves of one row of the fused
// gate_up projection, rounded as `F.silu(gate) * up` is in that dtype (bf16: y = bf16( bf16(silu(gate)) * up )).
// Why: torch runs it as silu and mul over strided halves, a noticeable share of a prefill step
// (docs/performance.md); this is one pass (read the row once, write half of it). One source for every ISA
// level and both dtypes: kiln_simd.h (its exp too), compiled per level by isa_variants.py (uint16_t rows hold
// bf16 bits).
#include "kiln_torch.h"

#include "kiln_simd.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

namespace simd = kiln::simd;
using simd::F;
using simd::W;

template <typename T>
void silu_mul_row(const T* g, const T* u, T* y, int64_t n) {
  const F one = simd::set1(1.f);
  for (int64_t i = 0; i < n; i += W) {
    const F x = simd::load_n(g + i, n - i);
    const F silu = simd::div(x, simd::add(one, simd::exp(simd::sub(simd::zero(), x))));
    simd::store_n(y + i, simd::mul(simd::round_as<T>(silu), simd::load_n(u + i, n - i)), n - i);
  }
}

template <typename T>
void run(const T* xp, T* op, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = xp + r * 2 * n;
      silu_mul_row(g, g + n, op + r * n, n);
    }
  });
}

torch::Tensor silu_mul(torch::Tensor gate_up) {
  const auto dtype = gate_up.scalar_type();
  TORCH_CHECK((dtype == torch::kBFloat16 || dtype == torch::kFloat32) && gate_up.device().is_cpu(),
              "bf16 or fp32 CPU tensors only");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up must be [T, 2 * I]");
  auto x = gate_up.contiguous();
  const int64_t rows = x.size(0), n = x.size(1) / 2;
  auto out = torch::empty({rows, n}, x.options());
  if (dtype == torch::kFloat32) {
    run(x.data_ptr<float>(), out.data_ptr<float>(), rows, n);
  } else {
    run(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()),
        reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), rows, n);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("silu_mul", &silu_mul, "silu(gate) * up of bf16 or fp32 [T, 2I] rows, F.silu(g) * u rounding",
        py::arg("gate_up"), py::call_guard<py::gil_scoped_release>());
}
