// RMSNorm for bf16 or fp32 activations, with Hugging Face's LlamaRMSNorm rounding:
//   r = 1 / sqrt(mean(x^2) + eps) in fp32;  bf16: y = bf16( bf16(x * r) * w );  fp32: y = (x * r) * w
// Why: F.rms_norm on bf16 CPU tensors dispatches ~10 small ops (casts, pow, mean, rsqrt, muls) per
// call, and a decode step calls it 2 * layers + 1 times; on fp32 (kiln's dtype on CPUs without native bf16) it is
// one op but still two passes and a reduction torch does not fuse with the add before it. This is one pass over
// the row and a single op dispatch. One source for every ISA level and both dtypes: kiln_simd.h, compiled per
// level by isa_variants.py, the row functions templated over the element type (uint16_t rows hold bf16 bits).
// add_rms_norm also does the residual add that precedes each norm in a decoder layer (one op and one
// pass fewer per norm: 60 of each per step on SmolLM2-135M).
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
void rms_row(const T* xr, const T* wp, T* orow, int64_t h, float eps) {
  F acc = simd::zero();
  for (int64_t i = 0; i < h; i += W) {
    const F v = simd::load_n(xr + i, h - i);
    acc = simd::fmadd(v, v, acc);
  }
  const float inv = 1.0f / std::sqrt(simd::reduce_add(acc) / static_cast<float>(h) + eps);
  const F vinv = simd::set1(inv);
  for (int64_t i = 0; i < h; i += W) {
    const F normed = simd::round_as<T>(simd::mul(simd::load_n(xr + i, h - i), vinv));
    simd::store_n(orow + i, simd::mul(normed, simd::load_n(wp + i, h - i)), h - i);
  }
}

// sum = x + d as torch adds (fp32 sum, rounded once to T), then the RMSNorm of the stored sum
template <typename T>
void add_rms_row(const T* xr, const T* dr, const T* wp, T* srow, T* orow, int64_t h, float eps) {
  for (int64_t i = 0; i < h; i += W)
    simd::store_n(srow + i, simd::add(simd::load_n(xr + i, h - i), simd::load_n(dr + i, h - i)), h - i);
  rms_row(srow, wp, orow, h, eps);  // the row is in L1 now
}

// the rows' element type for kiln_simd.h: float, or the bf16 bits as uint16_t
template <typename T>
auto* elements(const torch::Tensor& t) {
  if constexpr (std::is_same_v<T, float>) return t.data_ptr<float>();
  else return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>());
}

void check_dtypes(std::initializer_list<const torch::Tensor*> tensors) {
  const auto dtype = (*tensors.begin())->scalar_type();
  TORCH_CHECK(dtype == torch::kBFloat16 || dtype == torch::kFloat32, "bf16 or fp32 tensors only");
  for (const auto* t : tensors) {
    TORCH_CHECK(t->scalar_type() == dtype, "all tensors must have one dtype");
    TORCH_CHECK(t->device().is_cpu(), "CPU tensors only");
  }
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check_dtypes({&x, &weight});
  const int64_t h = x.size(-1);
  TORCH_CHECK(weight.numel() == h, "weight must have the last dim of x");
  auto xc = x.contiguous();
  auto wc = weight.contiguous();
  auto out = torch::empty_like(xc);
  const int64_t rows = xc.numel() / h;
  const float feps = static_cast<float>(eps);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* xp = elements<T>(xc);
    const T* wp = elements<T>(wc);
    T* op = elements<T>(out);
    // one row is cheap: parallelise only across many rows (prefill)
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) rms_row(xp + r * h, wp, op + r * h, h, feps);
    });
  };
  if (xc.scalar_type() == torch::kFloat32) run(float{});
  else run(uint16_t{});
  return out;
}

// (x + d, RMSNorm(x + d)): the residual add before each norm of a decoder layer, in the same pass
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor d, torch::Tensor weight,
                                                      double eps) {
  check_dtypes({&x, &d, &weight});
  TORCH_CHECK(x.sizes() == d.sizes(), "x and d must have the same shape");
  const int64_t h = x.size(-1);
  TORCH_CHECK(weight.numel() == h, "weight must have the last dim of x");
  auto xc = x.contiguous();
  auto dc = d.contiguous();
  auto wc = weight.contiguous();
  auto sum = torch::empty_like(xc);
  auto out = torch::empty_like(xc);
  const int64_t rows = xc.numel() / h;
  const float feps = static_cast<float>(eps);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* xp = elements<T>(xc);
    const T* dp = elements<T>(dc);
    const T* wp = elements<T>(wc);
    T* sp = elements<T>(sum);
    T* op = elements<T>(out);
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) add_rms_row(xp + r * h, dp + r * h, wp, sp + r * h, op + r * h, h, feps);
    });
  };
  if (xc.scalar_type() == torch::kFloat32) run(float{});
  else run(uint16_t{});
  return {sum, out};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of bf16 or fp32 rows with Hugging Face's rounding", py::arg("x"),
        py::arg("weight"), py::arg("eps"), py::call_guard<py::gil_scoped_release>());
  m.def("add_rms_norm", &add_rms_norm, "(x + d, RMSNorm(x + d)) of bf16 or fp32 rows, torch's add and HF's rounding",
        py::arg("x"), py::arg("d"), py::arg("weight"), py::arg("eps"), py::call_guard<py::gil_scoped_release>());
}
