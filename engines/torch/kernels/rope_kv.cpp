// RoPE on q and k plus the KV-cache write of a step, in one op (a prefill also gets its rotated keys back).
//   qkv [T, (H + 2 KVH) D] (bf16 | fp32), cos / sin [P, D] (qkv's dtype; sin sign-folded as in llama.py),
//   positions [T] int64, slots [T] int64, cache [2, KVH, NB, BS, D] (qkv's dtype, or int8 codes for an
//   int8 / fp8 e4m3fn cache), scales [2, KVH] fp32 (quantized kinds) -> q [T, H, D] rotated, qkv's dtype,
//   and with return_keys the rotated k [T, KVH, D] (what a prefill's attention reads), else an undefined tensor.
// Same arithmetic as the torch path it replaces (llama._rotate, attention.write_kv / KVLayer.write), so a
// step gives the same bits either way: x * cos and swapped * sin are rounded to the model dtype before
// they are added (torch rounds after each op), and quantization divides by the scale, rounds half to even
// and clamps (int8) or clamps and converts with c10's e4m3fn rounding (fp8). Built with
// -ffp-contract=off so the compiler cannot fuse a multiply and an add into an FMA that rounds once.
// Why: the torch path is ~15 small ops per layer (slices, cat, two muls, add, stack, casts, division,
// round, clamp, index_copy_), about a tenth of a batch-1 decode step on a small model.
#include "kiln_torch.h"

#include "kiln_simd.h"

#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>

#include <algorithm>

#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

template <typename T>
inline T round_to(float v) {
  return static_cast<T>(v);
}

template <>
inline at::BFloat16 round_to<at::BFloat16>(float v) {  // torch's vectorised ops' rounding (kiln_bf16.h)
  return at::BFloat16(kiln::float_to_bf16(v), at::BFloat16::from_bits());
}

// out[i] = x[i] * cos[i] + swapped(x)[i] * sin[i] for one head, each product rounded to T first
template <typename T>
inline void rotate(const T* x, const T* cos, const T* sin, T* out, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < d; ++i) {
    const T sw = x[i < half ? i + half : i - half];
    const T a = round_to<T>(static_cast<float>(x[i]) * static_cast<float>(cos[i]));
    const T b = round_to<T>(static_cast<float>(sw) * static_cast<float>(sin[i]));
    out[i] = round_to<T>(static_cast<float>(a) + static_cast<float>(b));
  }
}

// The same for bf16 in vectors when head_dim is a multiple of two vectors (the halves are whole vectors):
// identical bits, since each product and the sum are rounded to bf16 (nearest even) exactly as above.
// Why: at a long prefill the scalar loop costs as much as torch's ops.
namespace simd = kiln::simd;

inline const uint16_t* bits_of(const at::BFloat16* p) { return reinterpret_cast<const uint16_t*>(p); }

void rotate_bf16_simd(const at::BFloat16* x, const at::BFloat16* cos, const at::BFloat16* sin, at::BFloat16* out,
                      int64_t d) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < d; i += simd::W) {
    const simd::F a = simd::round_bf16(simd::mul(simd::load_bf16(bits_of(x + i), simd::W), simd::load_bf16(bits_of(cos + i), simd::W)));
    const simd::F b = simd::round_bf16(
        simd::mul(simd::load_bf16(bits_of(x + (i + half) % d), simd::W), simd::load_bf16(bits_of(sin + i), simd::W)));
    simd::store_bf16(reinterpret_cast<uint16_t*>(out + i), simd::add(a, b), simd::W);
  }
}

template <typename T>
inline void rotate_fast(const T* x, const T* cos, const T* sin, T* out, int64_t d, bool vector) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (vector) return rotate_bf16_simd(x, cos, sin, out, d);
  }
  rotate(x, cos, sin, out, d);
}

inline int8_t quantize(float v, float scale, bool fp8) {
  float x = v / scale;
  if (!fp8) {
    x = std::nearbyint(x);  // the default rounding mode: half to even, like torch.round
    x = std::fmin(std::fmax(x, -127.0f), 127.0f);
    return static_cast<int8_t>(x);
  }
  x = std::fmin(std::fmax(x, -448.0f), 448.0f);
  const c10::Float8_e4m3fn f(x);
  return static_cast<int8_t>(f.x);
}

template <typename T>
void run(const T* qkv, const T* cos, const T* sin, const int64_t* pos, const int64_t* slots, void* cache,
         const float* scales, int kind, T* q_out, T* k_out, int64_t T_, int64_t H, int64_t KVH, int64_t D,
         int64_t NB, int64_t BS) {
  const int64_t row = (H + 2 * KVH) * D;
  const int64_t half_cache = KVH * NB * BS * D;  // elements of the key half of the cache
  // tokens are independent (distinct slots): a prefill's thousands spread over the threads, a decode's few do not
  const bool vector = D % (2 * simd::W) == 0;
  at::parallel_for(0, T_, 256, [&](int64_t begin, int64_t end) {
  std::vector<T> k(D);
  for (int64_t t = begin; t < end; ++t) {
    const T* x = qkv + t * row;
    const T* c = cos + pos[t] * D;
    const T* s = sin + pos[t] * D;
    for (int64_t h = 0; h < H; ++h) rotate_fast(x + h * D, c, s, q_out + (t * H + h) * D, D, vector);
    const int64_t block = slots[t] / BS, offset = slots[t] % BS;
    for (int64_t h = 0; h < KVH; ++h) {
      rotate_fast(x + (H + h) * D, c, s, k.data(), D, vector);
      if (k_out) std::copy(k.begin(), k.end(), k_out + (t * KVH + h) * D);
      const T* v = x + (H + KVH + h) * D;
      const int64_t at = ((h * NB + block) * BS + offset) * D;
      if (kind == 0) {
        T* kc = static_cast<T*>(cache) + at;
        T* vc = static_cast<T*>(cache) + half_cache + at;
        for (int64_t i = 0; i < D; ++i) {
          kc[i] = k[i];
          vc[i] = v[i];
        }
      } else {
        int8_t* kc = static_cast<int8_t*>(cache) + at;
        int8_t* vc = static_cast<int8_t*>(cache) + half_cache + at;
        const float ks = scales[h], vs = scales[KVH + h];
        for (int64_t i = 0; i < D; ++i) {
          kc[i] = quantize(static_cast<float>(k[i]), ks, kind == 2);
          vc[i] = quantize(static_cast<float>(v[i]), vs, kind == 2);
        }
      }
    }
  }
  });
}

std::tuple<torch::Tensor, torch::Tensor> rope_store(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor positions,
                         torch::Tensor slots, torch::Tensor cache, c10::optional<torch::Tensor> scales,
                         std::string kind, int64_t heads, int64_t kv_heads, bool return_keys) {
  TORCH_CHECK(qkv.device().is_cpu() && cache.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous(), "qkv [T, (H + 2 KVH) D], contiguous");
  TORCH_CHECK(cache.dim() == 5 && cache.size(0) == 2 && cache.size(1) == kv_heads && cache.is_contiguous(),
              "cache [2, KVH, NB, BS, D], contiguous");
  const int64_t T_ = qkv.size(0), D = cache.size(4), NB = cache.size(2), BS = cache.size(3);
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * D, "qkv width is not (H + 2 KVH) D");
  TORCH_CHECK(cos.scalar_type() == qkv.scalar_type() && sin.scalar_type() == qkv.scalar_type() &&
                  cos.is_contiguous() && sin.is_contiguous() && cos.size(1) == D,
              "cos / sin [P, D] in qkv's dtype");
  auto pos = positions.to(torch::kInt64).contiguous();
  auto sl = slots.to(torch::kInt64).contiguous();
  TORCH_CHECK(pos.numel() == T_ && sl.numel() == T_, "one position and one slot per token");
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t* sp = sl.data_ptr<int64_t>();
  for (int64_t t = 0; t < T_; ++t) {
    TORCH_CHECK(pp[t] >= 0 && pp[t] < cos.size(0), "position beyond the RoPE table");
    TORCH_CHECK(sp[t] >= 0 && sp[t] < NB * BS, "slot out of range");
  }
  int k = 0;
  torch::Tensor sc;
  if (kind == "int8" || kind == "fp8") {
    TORCH_CHECK(cache.scalar_type() == torch::kInt8, "a quantized cache is passed as int8 codes");
    TORCH_CHECK(scales.has_value() && scales->numel() == 2 * kv_heads, "scales [2, KVH]");
    sc = scales->to(torch::kFloat32).contiguous();
    k = kind == "int8" ? 1 : 2;
  } else {
    TORCH_CHECK(kind == "model" && cache.scalar_type() == qkv.scalar_type(), "a model-dtype cache matches qkv");
  }
  const float* scp = k ? sc.data_ptr<float>() : nullptr;
  auto q = torch::empty({T_, heads, D}, qkv.options());
  auto keys = return_keys ? torch::empty({T_, kv_heads, D}, qkv.options()) : torch::Tensor();
  if (qkv.scalar_type() == torch::kFloat32) {
    run<float>(qkv.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), pp, sp, cache.data_ptr(), scp,
               k, q.data_ptr<float>(), return_keys ? keys.data_ptr<float>() : nullptr, T_, heads, kv_heads, D, NB, BS);
  } else {
    TORCH_CHECK(qkv.scalar_type() == torch::kBFloat16, "qkv must be bf16 or fp32");
    run<at::BFloat16>(qkv.data_ptr<at::BFloat16>(), cos.data_ptr<at::BFloat16>(), sin.data_ptr<at::BFloat16>(), pp,
                      sp, cache.data_ptr(), scp, k, q.data_ptr<at::BFloat16>(),
                      return_keys ? keys.data_ptr<at::BFloat16>() : nullptr, T_, heads, kv_heads, D, NB, BS);
  }
  return {q, keys};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rope_store", &rope_store, "RoPE on q and k and the KV-cache write of a step", py::arg("qkv"),
        py::arg("cos"), py::arg("sin"), py::arg("positions"), py::arg("slots"), py::arg("cache"),
        py::arg("scales"), py::arg("kind"), py::arg("heads"), py::arg("kv_heads"), py::arg("return_keys") = false,
        py::call_guard<py::gil_scoped_release>());
}
