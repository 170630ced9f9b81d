// Grammar masks on float32 logits [R, V] in place: token t of row r keeps its logit when bit t % 32 of
// bitmask[r][t / 32] is set (xgrammar's layout) and becomes -inf otherwise.
// Why: xgrammar's CPU kernel and torch's bit unpacking cost several percent of a decode step at batch 32
// (docs/performance.md); a masked blend per vector of logits reads each row once. One source for every ISA
// level: kiln_simd.h, compiled per level by isa_variants.py.
#include "kiln_torch.h"

#include "kiln_simd.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

namespace {

namespace simd = kiln::simd;
using simd::F;
using simd::W;

void mask_portable(float* x, const int32_t* bits, int64_t V) {
  for (int64_t t = 0; t < V; ++t)
    if (!((static_cast<uint32_t>(bits[t >> 5]) >> (t & 31)) & 1u)) x[t] = -INFINITY;
}

void mask_simd(float* x, const int32_t* bits, int64_t V) {
  const F neg_inf = simd::set1(-INFINITY);
  int64_t t = 0;
  for (; t + 32 <= V; t += 32) {
    const uint32_t word = static_cast<uint32_t>(bits[t >> 5]);
    if (word == 0xFFFFFFFFu) continue;
    // keep x where the bit is set, -inf elsewhere
    for (int64_t j = 0; j < 32; j += W) simd::store(x + t + j, simd::select_bits(word >> j, neg_inf, simd::load(x + t + j)));
  }
  if (t < V) mask_portable(x + t, bits + (t >> 5), V - t);
}

void apply_token_bitmask(torch::Tensor x, torch::Tensor bitmask) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous float32 CPU matrix");
  TORCH_CHECK(bitmask.device().is_cpu() && bitmask.scalar_type() == torch::kInt32 && bitmask.dim() == 2 &&
                  bitmask.is_contiguous() && bitmask.size(0) == x.size(0) && bitmask.size(1) * 32 >= x.size(1),
              "bitmask must be a contiguous int32 [R, ceil(V / 32)] CPU matrix");
  const int64_t R = x.size(0), V = x.size(1), words = bitmask.size(1);
  float* xp = x.data_ptr<float>();
  const int32_t* bp = bitmask.data_ptr<int32_t>();
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      mask_simd(xp + r * V, bp + r * words, V);
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("apply_token_bitmask", &apply_token_bitmask, "grammar bitmask on float32 CPU logits, in place", py::arg("x"),
        py::arg("bitmask"), py::call_guard<py::gil_scoped_release>());
}
