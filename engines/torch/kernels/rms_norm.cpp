// RMSNorm for bf16 activations, with Hugging Face's LlamaRMSNorm rounding:
//   r = 1 / sqrt(mean(x^2) + eps) in fp32;  y = bf16( bf16(x * r) * w )
// Why: F.rms_norm on bf16 CPU tensors dispatches ~10 small ops (casts, pow, mean, rsqrt, muls) per
// call, and a decode step calls it 2 * layers + 1 times. This is one pass over the row and a single
// op dispatch; AVX-512 where the CPU has it.
// add_rms_norm_bf16 also does the residual add that precedes each norm in a decoder layer (one op and one
// pass fewer per norm: 60 of each per step on SmolLM2-135M).
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

void rms_row(const uint16_t* xr, const uint16_t* wp, uint16_t* orow, int64_t h, float eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < h; ++i) {
    const float v = bf16_to_float(xr[i]);
    ss += v * v;
  }
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(h) + eps);
  for (int64_t i = 0; i < h; ++i) {
    const float normed = bf16_to_float(float_to_bf16(bf16_to_float(xr[i]) * inv));
    orow[i] = float_to_bf16(normed * bf16_to_float(wp[i]));
  }
}
// sum = bf16(x + d) (torch's bf16 add: fp32 sum, rounded once), then the RMSNorm of the stored sum
void add_rms_row(const uint16_t* xr, const uint16_t* dr, const uint16_t* wp, uint16_t* srow, uint16_t* orow, int64_t h,
                 float eps) {
  for (int64_t i = 0; i < h; ++i) srow[i] = float_to_bf16(bf16_to_float(xr[i]) + bf16_to_float(dr[i]));
  rms_row(srow, wp, orow, h, eps);
}

// The same row with AVX-512 (compiled for it by a target attribute, used when the CPU has it): the
// scalar loop above is slow enough to matter at prefill, where it runs 2 * layers + 1 times per step.
__attribute__((target("avx512f,avx512bw,avx512vl")))
void rms_row_avx512(const uint16_t* xr, const uint16_t* wp, uint16_t* orow, int64_t h, float eps) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < h; i += 16) {
    const __mmask16 m = h - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (h - i)) - 1);
    const __m512 v = widen16(xr + i, m);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  const float inv = 1.0f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(h) + eps);
  const __m512 vinv = _mm512_set1_ps(inv);
  for (int64_t i = 0; i < h; i += 16) {
    const __mmask16 m = h - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (h - i)) - 1);
    const __m512 normed = _mm512_castsi512_ps(_mm512_slli_epi32(to_bf16_bits(_mm512_mul_ps(widen16(xr + i, m), vinv)), 16));
    const __m512i y = to_bf16_bits(_mm512_mul_ps(normed, widen16(wp + i, m)));
    _mm256_mask_storeu_epi16(orow + i, m, _mm512_cvtepi32_epi16(y));
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl")))
void add_rms_row_avx512(const uint16_t* xr, const uint16_t* dr, const uint16_t* wp, uint16_t* srow, uint16_t* orow,
                        int64_t h, float eps) {
  for (int64_t i = 0; i < h; i += 16) {
    const __mmask16 m = h - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (h - i)) - 1);
    _mm256_mask_storeu_epi16(srow + i, m, _mm512_cvtepi32_epi16(to_bf16_bits(_mm512_add_ps(widen16(xr + i, m), widen16(dr + i, m)))));
  }
  rms_row_avx512(srow, wp, orow, h, eps);  // the row is in L1 now
}

bool avx512_ok() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
}

torch::Tensor rms_norm_bf16(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && weight.scalar_type() == torch::kBFloat16, "bf16 only");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "CPU tensors only");
  const int64_t h = x.size(-1);
  TORCH_CHECK(weight.numel() == h, "weight must have the last dim of x");
  auto xc = x.contiguous();
  auto wc = weight.contiguous();
  auto out = torch::empty_like(xc);
  const int64_t rows = xc.numel() / h;
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const float feps = static_cast<float>(eps);
  const bool vector = avx512_ok();
  // one row is cheap: parallelise only across many rows (prefill)
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (vector) rms_row_avx512(xp + r * h, wp, op + r * h, h, feps);
      else rms_row(xp + r * h, wp, op + r * h, h, feps);
    }
  });
  return out;
}

// (x + d, RMSNorm(x + d)): the residual add before each norm of a decoder layer, in the same pass
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm_bf16(torch::Tensor x, torch::Tensor d, torch::Tensor weight,
                                                           double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && d.scalar_type() == torch::kBFloat16 &&
              weight.scalar_type() == torch::kBFloat16, "bf16 only");
  TORCH_CHECK(x.device().is_cpu() && d.device().is_cpu() && weight.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(x.sizes() == d.sizes(), "x and d must have the same shape");
  const int64_t h = x.size(-1);
  TORCH_CHECK(weight.numel() == h, "weight must have the last dim of x");
  auto xc = x.contiguous();
  auto dc = d.contiguous();
  auto wc = weight.contiguous();
  auto sum = torch::empty_like(xc);
  auto out = torch::empty_like(xc);
  const int64_t rows = xc.numel() / h;
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const auto* dp = reinterpret_cast<const uint16_t*>(dc.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>());
  auto* sp = reinterpret_cast<uint16_t*>(sum.data_ptr<at::BFloat16>());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const float feps = static_cast<float>(eps);
  const bool vector = avx512_ok();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (vector) add_rms_row_avx512(xp + r * h, dp + r * h, wp, sp + r * h, op + r * h, h, feps);
      else add_rms_row(xp + r * h, dp + r * h, wp, sp + r * h, op + r * h, h, feps);
    }
  });
  return {sum, out};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm_bf16", &rms_norm_bf16, "RMSNorm of bf16 rows with Hugging Face's rounding",
        py::arg("x"), py::arg("weight"), py::arg("eps"), py::call_guard<py::gil_scoped_release>());
  m.def("add_rms_norm_bf16", &add_rms_norm_bf16, "(x + d, RMSNorm(x + d)) of bf16 rows, torch's add and HF's rounding",
        py::arg("x"), py::arg("d"), py::arg("weight"), py::arg("eps"), py::call_guard<py::gil_scoped_release>());
}
