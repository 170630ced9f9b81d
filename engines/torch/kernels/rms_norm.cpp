// RMSNorm for bf16 activations, with Hugging Face's LlamaRMSNorm rounding:
//   r = 1 / sqrt(mean(x^2) + eps) in fp32;  y = bf16( bf16(x * r) * w )
// Why: F.rms_norm on bf16 CPU tensors dispatches ~10 small ops (casts, pow, mean, rsqrt, muls) per
// call, and a decode step calls it 2 * layers + 1 times. This is one pass over the row and a single
// op dispatch. One source for every ISA level: kiln_simd.h, compiled per level by isa_variants.py.
// add_rms_norm_bf16 also does the residual add that precedes each norm in a decoder layer (one op and one
// pass fewer per norm: 60 of each per step on SmolLM2-135M).
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

void rms_row(const uint16_t* xr, const uint16_t* wp, uint16_t* orow, int64_t h, float eps) {
  F acc = simd::zero();
  for (int64_t i = 0; i < h; i += W) {
    const F v = simd::load_bf16(xr + i, h - i);
    acc = simd::fmadd(v, v, acc);
  }
  const float inv = 1.0f / std::sqrt(simd::reduce_add(acc) / static_cast<float>(h) + eps);
  const F vinv = simd::set1(inv);
  for (int64_t i = 0; i < h; i += W) {
    const F normed = simd::round_bf16(simd::mul(simd::load_bf16(xr + i, h - i), vinv));
    simd::store_bf16(orow + i, simd::mul(normed, simd::load_bf16(wp + i, h - i)), h - i);
  }
}

// sum = bf16(x + d) (torch's bf16 add: fp32 sum, rounded once), then the RMSNorm of the stored sum
void add_rms_row(const uint16_t* xr, const uint16_t* dr, const uint16_t* wp, uint16_t* srow, uint16_t* orow, int64_t h,
                 float eps) {
  for (int64_t i = 0; i < h; i += W)
    simd::store_bf16(srow + i, simd::add(simd::load_bf16(xr + i, h - i), simd::load_bf16(dr + i, h - i)), h - i);
  rms_row(srow, wp, orow, h, eps);  // the row is in L1 now
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
  // one row is cheap: parallelise only across many rows (prefill)
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      rms_row(xp + r * h, wp, op + r * h, h, feps);
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
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      add_rms_row(xp + r * h, dp + r * h, wp, sp + r * h, op + r * h, h, feps);
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
