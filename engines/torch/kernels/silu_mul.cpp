// SwiGLU's activation for bf16 rows: y = bf16( bf16(silu(gate)) * up ) with [gate | up] halves of one
// row of the fused gate_up projection, the rounding of `F.silu(gate) * up` in bf16.
// Why: torch runs it as silu and mul over strided halves, a noticeable share of a prefill step
// (docs/performance.md); this is one pass (read the row once, write half of it).
#include <torch/extension.h>

#include "kiln_bf16.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

using kiln::bf16_to_float;
using kiln::float_to_bf16;
using kiln::to_bf16_bits;
using kiln::widen16;

void silu_mul_row(const uint16_t* g, const uint16_t* u, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = bf16_to_float(g[i]);
    const float s = bf16_to_float(float_to_bf16(x / (1.0f + std::exp(-x))));
    y[i] = float_to_bf16(s * bf16_to_float(u[i]));
  }
}

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

// exp(x), Cephes expf polynomial with range reduction (~1-2 ulp, like torch's Sleef exp); clamped to
// the float range, so silu(x) -> 0 for x -> -inf and x for x -> +inf
AVX512 inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.3762626647949f)), _mm512_set1_ps(88.3762626647949f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

AVX512 void silu_mul_row_avx512(const uint16_t* g, const uint16_t* u, uint16_t* y, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 x = widen16(g + i, m);
    const __m512 silu = _mm512_div_ps(x, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), x))));
    const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(to_bf16_bits(silu), 16));
    _mm256_mask_storeu_epi16(y + i, m, _mm512_cvtepi32_epi16(to_bf16_bits(_mm512_mul_ps(s, widen16(u + i, m)))));
  }
}

bool avx512_ok() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
}

torch::Tensor silu_mul_bf16(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == torch::kBFloat16 && gate_up.device().is_cpu(), "bf16 CPU tensors only");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up must be [T, 2 * I]");
  auto x = gate_up.contiguous();
  const int64_t rows = x.size(0), n = x.size(1) / 2;
  auto out = torch::empty({rows, n}, x.options());
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const bool vector = avx512_ok();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint16_t* g = xp + r * 2 * n;
      if (vector) silu_mul_row_avx512(g, g + n, op + r * n, n);
      else silu_mul_row(g, g + n, op + r * n, n);
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("silu_mul_bf16", &silu_mul_bf16, "silu(gate) * up of bf16 [T, 2I] rows, F.silu(g) * u rounding",
        py::arg("gate_up"), py::call_guard<py::gil_scoped_release>());
}
