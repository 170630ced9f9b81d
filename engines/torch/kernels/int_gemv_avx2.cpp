// int_gemv.cpp's weight-only INT8 / INT4 linear and dequantizers for CPUs with AVX2 (+FMA, F16C) and no
// AVX-512: the same functions, arguments, layouts (int_linear.pack_int4) and results up to fp32 summation order.
//
// Why a separate source: int_gemv.cpp is built around 16-lane registers (hsum16 over 16 accumulators, vpermps over
// a 16-entry int4 table, masked tails); on AVX2 a plain form is enough to stream each weight byte once per
// call, which is what decode is bound by.
// How: x is converted once to fp32, zero padded to a multiple of 64 columns. For each weight row (threads split
// the rows), 16 columns at a time are widened to fp32 and multiplied into two 8-lane accumulators per row of x
// (passes of up to 4 rows of x over the weight row, which is then in L1): every output is 16 lane sums of K/16
// products, added in a fixed tree, then scaled and biased as separate roundings: deterministic, independent of
// the other rows of x and of the thread count. int4 weights are decoded as (u - 8 - z) * s in fp32, the exact
// value of engines.quant.rtn.dequantize. VNNI (vpdpbusd) does not apply: x stays bf16 / fp32 (W8A16).
#include "kiln_torch.h"

#include "kiln_simd.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

namespace simd = kiln::simd;
static_assert(simd::W == 8, "int_gemv_avx2.cpp is the AVX2 build");

constexpr int64_t kChunk = 64;  // int4: columns per 32-byte chunk; x is padded to a multiple of this
constexpr int kRowsPerPass = 4;

struct Prep {
  at::Tensor x;  // [M, K] contiguous
  int64_t M;
  bool flat;
};

Prep prep_x(const at::Tensor& x_in, int64_t K, const char* name) {
  TORCH_CHECK(x_in.device().is_cpu(), name, ": CPU tensors only");
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 || x_in.scalar_type() == at::kFloat, name,
              ": x must be bfloat16 or float32");
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == K, name, ": x must be [..., K] with K = ", K);
  const bool flat = x_in.dim() == 2;
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x_in.dim(); ++d) M *= x_in.size(d);
  return {flat ? x_in.contiguous() : x_in.reshape({M, K}).contiguous(), M, flat};
}

at::Tensor finish(const at::Tensor& y, const at::Tensor& x_in, bool flat, int64_t N) {
  if (flat) return y;
  auto sizes = x_in.sizes().vec();
  sizes.back() = N;
  return y.view(sizes);
}

at::Tensor bias_f32(const c10::optional<at::Tensor>& b, int64_t N, const char* name) {
  if (!b.has_value() || !b->defined()) return at::Tensor();
  TORCH_CHECK(b->device().is_cpu() && b->numel() == N && at::isFloatingType(b->scalar_type()), name,
              ": bias must be a float CPU tensor with N elements");
  return b->scalar_type() == at::kFloat ? b->contiguous() : b->to(at::kFloat).contiguous();
}

// x [M, K] -> fp32 [M, Kp], zero past K (exact for bf16)
at::Tensor x_to_f32(const at::Tensor& x, int64_t M, int64_t K, int64_t Kp) {
  at::Tensor out = at::zeros({M, Kp}, x.options().dtype(at::kFloat));
  out.narrow(1, 0, K).copy_(x);
  return out;
}

inline simd::F i8x8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// dot(x row m0 + m, weight row n) for the MB rows of one pass: MB is a template argument so that the 2 * MB
// accumulators stay in registers (with a run-time count GCC kept them in memory, 6x slower).
template <int MB, typename Decode16>
inline void row_pass(int64_t n, const float* x, int64_t Kp, int64_t kend, const Decode16& decode, float* sums) {
  simd::F a0[MB], a1[MB];
  for (int m = 0; m < MB; ++m) a0[m] = a1[m] = simd::zero();
  for (int64_t k = 0; k < kend; k += 16) {
    simd::F lo, hi;
    decode(n, k, lo, hi);
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      a0[m] = simd::fmadd(simd::load(x + m * Kp + k), lo, a0[m]);
      a1[m] = simd::fmadd(simd::load(x + m * Kp + k + 8), hi, a1[m]);
    }
  }
  for (int m = 0; m < MB; ++m) sums[m] = simd::reduce_add(simd::add(a0[m], a1[m]));
}

// y[m, n] = dot(x[m], w[n]) * scale[n] + bias[n] (separate roundings), rows of W split over the threads.
// decode(n, k, lo, hi): weights k .. k + 15 of row n as two fp32 vectors, for k < kend (K rounded up to 16).
template <typename Decode16>
void rows(int64_t N, int64_t M, int64_t Kp, int64_t kend, const float* x, const float* scales, const float* bias,
          void* y, bool bf16, const Decode16& decode) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(Kp, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t m0 = 0; m0 < M; m0 += kRowsPerPass) {
        const int64_t mb = std::min<int64_t>(kRowsPerPass, M - m0);
        const float* xm = x + m0 * Kp;
        float sums[kRowsPerPass];
        if (mb == 1) row_pass<1>(n, xm, Kp, kend, decode, sums);
        else if (mb == 2) row_pass<2>(n, xm, Kp, kend, decode, sums);
        else if (mb == 3) row_pass<3>(n, xm, Kp, kend, decode, sums);
        else row_pass<4>(n, xm, Kp, kend, decode, sums);
        for (int64_t m = 0; m < mb; ++m) {
          float v = sums[m];
          if (scales && bf16) v = kiln::round_bf16(v);  // as the large-M path rounds (int_gemv.cpp's epilogue)
          if (scales) v *= scales[n];
          if (bias) v += bias[n];
          const int64_t idx = (m0 + m) * N + n;
          if (bf16) static_cast<uint16_t*>(y)[idx] = kiln::float_to_bf16(v);
          else static_cast<float*>(y)[idx] = v;
        }
      }
    }
  });
}

at::Tensor int8_linear(const at::Tensor& x_in, const at::Tensor& qweight_in, const at::Tensor& scales_in,
                       const c10::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(qweight_in.device().is_cpu() && qweight_in.scalar_type() == at::kChar && qweight_in.dim() == 2,
              "int8_linear: qweight must be int8 [N, K] on CPU");
  const int64_t N = qweight_in.size(0), K = qweight_in.size(1);
  TORCH_CHECK(scales_in.device().is_cpu() && scales_in.scalar_type() == at::kFloat && scales_in.numel() == N,
              "int8_linear: scales must be float32 [N]");
  Prep p = prep_x(x_in, K, "int8_linear");
  const at::Tensor qweight = qweight_in.contiguous(), scales = scales_in.contiguous();
  const at::Tensor bias = bias_f32(bias_in, N, "int8_linear");
  at::Tensor y = at::empty({p.M, N}, p.x.options());
  if (p.M == 0 || N == 0) return finish(y, x_in, p.flat, N);
  if (K == 0) {
    bias.defined() ? y.copy_(bias.view({1, N}).expand({p.M, N})) : y.zero_();
    return finish(y, x_in, p.flat, N);
  }
  const int64_t Kp = (K + kChunk - 1) / kChunk * kChunk;
  const at::Tensor x = x_to_f32(p.x, p.M, K, Kp);
  const int8_t* w = qweight.data_ptr<int8_t>();
  const auto decode = [&](int64_t n, int64_t k, simd::F& lo, simd::F& hi) {
    const int8_t* row = w + n * K + k;
    if (K - k >= 16) {
      lo = i8x8(row);
      hi = i8x8(row + 8);
    } else {  // the row's tail: its bytes, zero beyond (x is zero there too)
      alignas(16) int8_t tail[16] = {};
      std::memcpy(tail, row, static_cast<size_t>(K - k));
      lo = i8x8(tail);
      hi = i8x8(tail + 8);
    }
  };
  rows(N, p.M, Kp, (K + 15) / 16 * 16, x.data_ptr<float>(), scales.data_ptr<float>(), bias.defined() ? bias.data_ptr<float>() : nullptr,
       y.data_ptr(), y.scalar_type() == at::kBFloat16, decode);
  return finish(y, x_in, p.flat, N);
}

struct I4 {
  const uint8_t* w;
  int64_t ldw;  // bytes per row
  const float* sc;
  const int8_t* zp;     // nullptr: symmetric
  const uint16_t* dm;   // affine codes (GGUF Q4_1): float16 (d, m) per group, w = d * u + m; nullptr otherwise
  bool round_bf16;      // bf16 x: each weight rounded to bf16 (int_gemv.cpp's i4_table)
  int64_t G, gsize;
};

// The packed codes' shape, and the group size, checked against K: the part every int4 form shares.
I4 check_packed(const at::Tensor& packed, int64_t group_size, int64_t K, const char* name) {
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.dim() == 2 &&
                  packed.is_contiguous(),
              name, ": packed must be contiguous uint8 [N, Kp/2] on CPU (int_linear.pack_int4)");
  const int64_t Kp = packed.size(1) * 2;
  TORCH_CHECK(Kp % kChunk == 0 && K <= Kp && Kp - K < kChunk, name, ": packed rows hold ", Kp,
              " columns, which is not K = ", K, " rounded up to a multiple of 64");
  const bool group_ok = group_size == 16 || group_size == 32 || (group_size > 0 && group_size % 64 == 0);
  TORCH_CHECK(group_ok && K % group_size == 0, name, ": group_size must be 16, 32 or a multiple of 64 dividing K, got ",
              group_size, " for K = ", K);
  return {packed.data_ptr<uint8_t>(), Kp / 2, nullptr, nullptr, nullptr, false, K / group_size, group_size};
}

I4 check_affine(const at::Tensor& packed, const at::Tensor& dm, int64_t group_size, int64_t K, bool round_bf16,
                const char* name) {
  I4 P = check_packed(packed, group_size, K, name);
  TORCH_CHECK(dm.device().is_cpu() && dm.scalar_type() == at::kHalf && dm.is_contiguous() && dm.dim() == 3 &&
                  dm.size(0) == packed.size(0) && dm.size(1) == P.G && dm.size(2) == 2,
              name, ": dm must be contiguous float16 [N, K / group_size, 2] (d, m per group)");
  P.dm = reinterpret_cast<const uint16_t*>(dm.data_ptr<at::Half>());
  P.round_bf16 = round_bf16;
  return P;
}

I4 check_i4(const at::Tensor& packed, const at::Tensor& scales_in, const c10::optional<at::Tensor>& zeros,
            int64_t group_size, int64_t K, const char* name, at::Tensor& scales, at::Tensor& zeros_keep) {
  I4 P = check_packed(packed, group_size, K, name);
  const int64_t N = packed.size(0), G = P.G;
  TORCH_CHECK(scales_in.device().is_cpu() && scales_in.scalar_type() == at::kFloat && scales_in.dim() == 2 &&
                  scales_in.size(0) == N && scales_in.size(1) == G,
              name, ": scales must be float32 [N, K / group_size]");
  scales = scales_in.contiguous();
  P.sc = scales.data_ptr<float>();
  if (zeros.has_value() && zeros->defined()) {
    TORCH_CHECK(zeros->device().is_cpu() && zeros->scalar_type() == at::kChar && zeros->dim() == 2 &&
                    zeros->size(0) == N && zeros->size(1) == G,
                name, ": zeros must be int8 [N, K / group_size]");
    zeros_keep = zeros->contiguous();
    P.zp = zeros_keep.data_ptr<int8_t>();
  }
  return P;
}

// Columns k .. k + 15 (k a multiple of 16, below K) of row n: word j of chunk k / 64 holds column k + j in its
// nibble (k % 64) / 16, as u = q + 8; the 16 columns share one group (group sizes are multiples of 16).
inline void i4_decode16(const I4& P, int64_t n, int64_t k, simd::F& lo, simd::F& hi) {
  const uint8_t* chunk = P.w + n * P.ldw + (k / kChunk) * 32;
  const __m256i shift = _mm256_set1_epi64x(4 * ((k % kChunk) / 16));
  const int64_t g = k / P.gsize, i = n * P.G + g;
  const __m256i nibble = _mm256_set1_epi32(0xF);
  const auto codes = [&](const uint8_t* words) {
    return _mm256_and_si256(
        _mm256_srl_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(words))),
                         _mm256_castsi256_si128(shift)),
        nibble);
  };
  if (P.dm) {  // d * u + m: one multiply, then one add (ggml's Q4_1 dequantization)
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(P.dm[2 * i])), m = _mm256_set1_ps(_cvtsh_ss(P.dm[2 * i + 1]));
    const auto affine = [&](const uint8_t* words) {
      // one FMA: u * d is exact for a float16 d, so this rounds as ggml's multiply-then-add does
      const simd::F v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(codes(words)), d, m);
      return P.round_bf16 ? simd::round_bf16(v) : v;
    };
    lo = affine(chunk);
    hi = affine(chunk + 16);
    return;
  }
  const int32_t offset = 8 + (P.zp ? P.zp[i] : 0);  // (u - 8 - z): exact in int32
  const __m256 scale = _mm256_set1_ps(P.sc[i]);
  const __m256i off = _mm256_set1_epi32(offset);
  const auto dequant = [&](const uint8_t* words) {
    const simd::F v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(codes(words), off)), scale);
    return P.round_bf16 ? simd::round_bf16(v) : v;
  };
  lo = dequant(chunk);
  hi = dequant(chunk + 16);
}

at::Tensor run_int4_linear(const I4& P, const at::Tensor& x_in, const c10::optional<at::Tensor>& bias_in, int64_t N,
                           const char* name) {
  const int64_t K = x_in.size(-1), Kp = P.ldw * 2;
  Prep p = prep_x(x_in, K, name);
  const at::Tensor bias = bias_f32(bias_in, N, name);
  at::Tensor y = at::empty({p.M, N}, p.x.options());
  if (p.M == 0 || N == 0) return finish(y, x_in, p.flat, N);
  if (K == 0) {
    bias.defined() ? y.copy_(bias.view({1, N}).expand({p.M, N})) : y.zero_();
    return finish(y, x_in, p.flat, N);
  }
  const at::Tensor x = x_to_f32(p.x, p.M, K, Kp);
  const auto decode = [&](int64_t n, int64_t k, simd::F& lo, simd::F& hi) { i4_decode16(P, n, k, lo, hi); };
  // K is a multiple of the group size, so of 16: the padding columns (past the last group) are not read. The
  // scales are per group, applied in the decode; there is none to apply after the sum.
  rows(N, p.M, Kp, K, x.data_ptr<float>(), nullptr, bias.defined() ? bias.data_ptr<float>() : nullptr, y.data_ptr(),
       y.scalar_type() == at::kBFloat16, decode);
  return finish(y, x_in, p.flat, N);
}

// bf16 x: the weights rounded to bf16, as int4_dequantize gives the large-M path (bf16_dot: int_gemv.cpp's)
at::Tensor int4_linear(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scales_in,
                       const c10::optional<at::Tensor>& zeros, int64_t group_size,
                       const c10::optional<at::Tensor>& bias_in, bool /*bf16_dot*/) {
  TORCH_CHECK(x_in.dim() >= 1, "int4_linear: x must be [..., K]");
  at::Tensor skeep, zkeep;
  I4 P = check_i4(packed, scales_in, zeros, group_size, x_in.size(-1), "int4_linear", skeep, zkeep);
  P.round_bf16 = x_in.scalar_type() == at::kBFloat16;
  return run_int4_linear(P, x_in, bias_in, packed.size(0), "int4_linear");
}

// bf16_dot: int_gemv.cpp's AVX512-BF16 path; never taken by this build (an AVX2 CPU has no AVX512-BF16).
at::Tensor int4_affine_linear(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& dm,
                              int64_t group_size, const c10::optional<at::Tensor>& bias_in, bool /*bf16_dot*/) {
  TORCH_CHECK(x_in.dim() >= 1, "int4_affine_linear: x must be [..., K]");
  const I4 P = check_affine(packed, dm, group_size, x_in.size(-1), x_in.scalar_type() == at::kBFloat16,
                            "int4_affine_linear");
  return run_int4_linear(P, x_in, bias_in, packed.size(0), "int4_affine_linear");
}

at::Tensor dequant_out(const c10::optional<at::Tensor>& out, int64_t N, int64_t K, at::ScalarType dtype,
                       const at::TensorOptions& opts, const char* name) {
  if (!out.has_value() || !out->defined()) return at::empty({N, K}, opts.dtype(dtype));
  TORCH_CHECK(out->device().is_cpu() && out->scalar_type() == dtype && out->is_contiguous() && out->dim() == 2 &&
                  out->size(0) == N && out->size(1) == K,
              name, ": out must be a contiguous CPU tensor [N, K] of the requested dtype");
  return *out;
}

// 16 values of one output row, the first min(n, 16) stored
inline void store16(void* out, bool bf16, int64_t idx, simd::F lo, simd::F hi, int64_t n) {
  if (bf16) {
    uint16_t* o = static_cast<uint16_t*>(out) + idx;
    simd::store_bf16(o, lo, n);
    if (n > 8) simd::store_bf16(o + 8, hi, n - 8);
    return;
  }
  float* o = static_cast<float*>(out) + idx;
  alignas(32) float v[16];
  _mm256_store_ps(v, lo);
  _mm256_store_ps(v + 8, hi);
  std::memcpy(o, v, static_cast<size_t>(std::min<int64_t>(n, 16)) * sizeof(float));
}

at::Tensor int8_dequantize(const at::Tensor& qweight_in, const at::Tensor& scales_in, at::ScalarType dtype,
                           const c10::optional<at::Tensor>& out_in) {
  TORCH_CHECK(qweight_in.device().is_cpu() && qweight_in.scalar_type() == at::kChar && qweight_in.dim() == 2,
              "int8_dequantize: qweight must be int8 [N, K] on CPU");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "int8_dequantize: dtype must be float32 or bfloat16");
  const int64_t N = qweight_in.size(0), K = qweight_in.size(1);
  TORCH_CHECK(scales_in.scalar_type() == at::kFloat && scales_in.numel() == N,
              "int8_dequantize: scales must be float32 [N]");
  const at::Tensor q = qweight_in.contiguous(), scales = scales_in.contiguous();
  at::Tensor out = dequant_out(out_in, N, K, dtype, q.options(), "int8_dequantize");
  const int8_t* w = q.data_ptr<int8_t>();
  const float* sc = scales.data_ptr<float>();
  void* o = out.data_ptr();
  const bool bf16 = dtype == at::kBFloat16;
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const simd::F s = simd::set1(sc[n]);
      for (int64_t k = 0; k < K; k += 16) {
        alignas(16) int8_t v[16] = {};
        std::memcpy(v, w + n * K + k, static_cast<size_t>(std::min<int64_t>(16, K - k)));
        store16(o, bf16, n * K + k, simd::mul(i8x8(v), s), simd::mul(i8x8(v + 8), s), K - k);
      }
    }
  });
  return out;
}

at::Tensor run_int4_dequantize(const I4& P, int64_t N, int64_t K, at::ScalarType dtype, const at::Tensor& packed,
                               const c10::optional<at::Tensor>& out_in, const char* name) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, name, ": dtype must be float32 or bfloat16");
  at::Tensor out = dequant_out(out_in, N, K, dtype, packed.options(), name);
  void* o = out.data_ptr();
  const bool bf16 = dtype == at::kBFloat16;
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < K; k += 16) {
        simd::F lo, hi;
        i4_decode16(P, n, k, lo, hi);
        store16(o, bf16, n * K + k, lo, hi, K - k);
      }
  });
  return out;
}

at::Tensor int4_dequantize(const at::Tensor& packed, const at::Tensor& scales_in,
                           const c10::optional<at::Tensor>& zeros, int64_t group_size, int64_t K,
                           at::ScalarType dtype, const c10::optional<at::Tensor>& out_in, bool /*bf16_dot*/) {
  at::Tensor skeep, zkeep;
  const I4 P = check_i4(packed, scales_in, zeros, group_size, K, "int4_dequantize", skeep, zkeep);
  return run_int4_dequantize(P, packed.size(0), K, dtype, packed, out_in, "int4_dequantize");
}

at::Tensor int4_affine_dequantize(const at::Tensor& packed, const at::Tensor& dm, int64_t group_size, int64_t K,
                                  at::ScalarType dtype, const c10::optional<at::Tensor>& out_in,
                                  bool /*bf16_dot*/) {
  const I4 P = check_affine(packed, dm, group_size, K, dtype == at::kBFloat16, "int4_affine_dequantize");
  return run_int4_dequantize(P, packed.size(0), K, dtype, packed, out_in, "int4_affine_dequantize");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_linear", &int8_linear, "y = x @ (q * s[:, None])^T (+ bias): W8A16, fp32 accumulation", py::arg("x"),
        py::arg("qweight"), py::arg("scales"), py::arg("bias") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("int4_linear", &int4_linear, "y = x @ dequant(W4)^T (+ bias): W4A16 group-wise, fp32 accumulation",
        py::arg("x"), py::arg("packed"), py::arg("scales"), py::arg("zeros"), py::arg("group_size"),
        py::arg("bias") = py::none(), py::arg("bf16_dot") = false, py::call_guard<py::gil_scoped_release>());
  m.def("int8_dequantize", &int8_dequantize, "q * s[:, None] as [N, K] float32/bfloat16", py::arg("qweight"),
        py::arg("scales"), py::arg("dtype"), py::arg("out") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("int4_dequantize", &int4_dequantize, "(q - z) * s as [N, K] float32/bfloat16", py::arg("packed"),
        py::arg("scales"), py::arg("zeros"), py::arg("group_size"), py::arg("K"), py::arg("dtype"),
        py::arg("out") = py::none(), py::arg("bf16_dot") = false, py::call_guard<py::gil_scoped_release>());
  m.def("int4_affine_linear", &int4_affine_linear, "y = x @ (d * u + m)^T (+ bias): affine int4 codes (GGUF Q4_1)",
        py::arg("x"), py::arg("packed"), py::arg("dm"), py::arg("group_size"), py::arg("bias") = py::none(),
        py::arg("bf16_dot") = false, py::call_guard<py::gil_scoped_release>());
  m.def("int4_affine_dequantize", &int4_affine_dequantize, "d * u + m as [N, K] float32/bfloat16", py::arg("packed"),
        py::arg("dm"), py::arg("group_size"), py::arg("K"), py::arg("dtype"), py::arg("out") = py::none(),
        py::arg("bf16_dot") = false, py::call_guard<py::gil_scoped_release>());
}
