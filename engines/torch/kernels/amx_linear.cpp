// Linear layers on Intel AMX: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), x bf16, fp32 accumulation, with W
// bf16, int8 codes (per-column scales) or group-wise int4 codes (per-group column scales, zero points).
//
// Why: from a few rows to a few dozen a linear layer only needs to stream its weight once, but the
// AVX-512 kernels (bf16_gemv.cpp, int_gemv.cpp) become compute-bound past ~8 rows and oneDNN's packed
// matmul streams the weight at about half the machine's read rate. AMX's tile multiply does 16x16x32
// multiply-adds per instruction, so the arithmetic disappears behind the weight stream.
//
// How:
//  - W is packed once at load (amx_linear.py, plain torch) into the order the kernel reads it: for
//    each block of 32 output columns nb and each block of 32 inputs kb (one "k step"), two B tiles of
//    1 KiB (columns 0-15 and 16-31), each 16 rows of input pairs x 16 columns x 2 bf16 (AMX's "VNNI"
//    layout: the two bf16 of a pair are adjacent). A thread's weights are one sequential stream.
//  - int8 / int4 codes are packed in the same order and widened exactly to bf16 in cache (widen_step*),
//    per k step into two alternating buffers when x fits one pass of 32 rows, else once per column block
//    and reused by every pass. Scales multiply the fp32 sums: per column at the end (int8), per group
//    and column after each group (int4, accumulate_group).
//  - Per 32 rows of x and 32 columns of W: four C tiles (16x16 fp32) accumulate over K; per k step the
//    two A tiles (x, 16 rows x 32 bf16, straight from x's row-major layout) and the two B tiles are
//    loaded and multiplied pairwise. More rows run as passes of 32 over the same column block.
//  - Threads (OpenMP, torch.get_num_threads()) own contiguous ranges of column blocks, so each
//    reads a contiguous slice of the packed weight; a software prefetch runs kPrefetch bytes ahead.
//  - Tile state is per thread and shared with oneDNN, which runs AMX kernels in the same OpenMP
//    threads: every call loads its own tile configuration and releases the tiles when done.
//  - Each output element is accumulated in the same order whatever M or the thread count:
//    deterministic and batch-invariant (row i depends on row i of x only).
//  - Linux hands out AMX state only on request: amx_init() asks once (arch_prctl); available()
//    in amx_linear.py calls it before anything else runs.
#include "kiln_torch.h"

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

namespace {

using bf16 = uint16_t;

constexpr int64_t kTileBytes = 1024;    // one B tile: 16 rows x 64 bytes
constexpr int64_t kPrefetch = 8192;     // bytes ahead in the weight stream

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: C (rows of x a: 0-15 / b: 16-31) x (columns 0-15 / 16-31); 4-5: A; 6-7: B.
static void configure(int rows_a, int rows_b) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64;
  cfg.rows[0] = cfg.rows[1] = cfg.rows[4] = static_cast<uint8_t>(rows_a);
  cfg.rows[2] = cfg.rows[3] = cfg.rows[5] = static_cast<uint8_t>(rows_b);
  cfg.rows[6] = cfg.rows[7] = 16;
  if (rows_b == 0) cfg.colsb[2] = cfg.colsb[3] = cfg.colsb[5] = 0;  // unused tiles must be all zero
  _tile_loadconfig(&cfg);
}

static inline void prefetch_span(const char* p) {
  // 2 KiB = 32 lines per k step: both B tiles of the step kPrefetch bytes ahead
  for (int i = 0; i < 2 * kTileBytes; i += 64) _mm_prefetch(p + i, _MM_HINT_T0);
}

// Rows m0.. of x (rows_a + rows_b <= 32, as configured) against one column block, k steps kb0..kb1: C tiles
// written to c (32 x 32 fp32). b_tiles(kb) returns the address of k step kb's two B tiles (2 KiB of bf16,
// tile order).
template <bool kTwo, typename BTiles>
static inline void block(const bf16* x, int64_t K, int64_t kb0, int64_t kb1, BTiles& b_tiles, float* c) {
  _tile_zero(0);
  _tile_zero(1);
  if (kTwo) {
    _tile_zero(2);
    _tile_zero(3);
  }
  const int64_t xstride = K * 2;
  const char* xa = reinterpret_cast<const char*>(x);
  const char* xb = xa + 16 * xstride;
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const char* w = b_tiles(kb);
    _tile_loadd(6, w, 64);
    _tile_loadd(7, w + kTileBytes, 64);
    _tile_loadd(4, xa + kb * 64, xstride);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (kTwo) {
      _tile_loadd(5, xb + kb * 64, xstride);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, 128);
  _tile_stored(1, c + 16, 128);
  if (kTwo) {
    _tile_stored(2, c + 16 * 32, 128);
    _tile_stored(3, c + 16 * 32 + 16, 128);
  }
}

// int4 groups: total (+)= c * the group's 32 column scales, rows x 32 fp32
static inline void accumulate_group(const float* c, int rows, const float* scale32, bool first, float* total) {
  const __m512 s0 = _mm512_loadu_ps(scale32), s1 = _mm512_loadu_ps(scale32 + 16);
  for (int r = 0; r < rows; ++r) {
    const float* cr = c + r * 32;
    float* tr = total + r * 32;
    __m512 lo = _mm512_mul_ps(_mm512_load_ps(cr), s0), hi = _mm512_mul_ps(_mm512_load_ps(cr + 16), s1);
    if (!first) {
      lo = _mm512_add_ps(lo, _mm512_load_ps(tr));
      hi = _mm512_add_ps(hi, _mm512_load_ps(tr + 16));
    }
    _mm512_store_ps(tr, lo);
    _mm512_store_ps(tr + 16, hi);
  }
}

// y = c (* scale) (+ bias), rounded once to bf16; scale32 / bias32: this block's 32 columns or null
static inline void epilogue(const float* c, int rows, const float* scale32, const float* bias32, bf16* y, int64_t N) {
  for (int r = 0; r < rows; ++r) {
    __m512 lo = _mm512_load_ps(c + r * 32), hi = _mm512_load_ps(c + r * 32 + 16);
    if (scale32) {
      lo = _mm512_mul_ps(lo, _mm512_loadu_ps(scale32));
      hi = _mm512_mul_ps(hi, _mm512_loadu_ps(scale32 + 16));
    }
    if (bias32) {
      lo = _mm512_add_ps(lo, _mm512_loadu_ps(bias32));
      hi = _mm512_add_ps(hi, _mm512_loadu_ps(bias32 + 16));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * N), (__m256i)_mm512_cvtneps_pbh(lo));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * N + 16), (__m256i)_mm512_cvtneps_pbh(hi));
  }
}

// One k step of int8 codes (1 KiB, tile order) -> bf16 (2 KiB, same order), exact: every int8 is a
// bf16. The per-column scale multiplies the fp32 sums in the epilogue.
static inline void widen_step(const int8_t* q, const int8_t* pf_end, bf16* out) {
  for (int i = 0; i < 1024; i += 64) {
    if (q + i + kPrefetch < pf_end) _mm_prefetch(reinterpret_cast<const char*>(q + i + kPrefetch), _MM_HINT_T0);
    for (int h = 0; h < 64; h += 32) {
      const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i + h))));
      const __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i + h + 16))));
      _mm512_store_si512(out + i + h, (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
  }
}

// One k step of int4 codes (512 bytes: per tile row of 32 values, 16 bytes with value j in the low nibble
// and value j + 16 in the high one, as unsigned u = q + 8) -> bf16 (q - z) in tile order, exact (|q - z|
// <= 15). zoff: the group's offsets z + 8 for this column block, int32 in tile-row lane order: per B tile
// h, 16 lanes for values 0-15 then 16 for values 16-31 (64 in all).
static inline void widen_step_int4(const uint8_t* q, const uint8_t* pf_end, const __m512i zoff[4], bf16* out) {
  const __m512i low4 = _mm512_set1_epi32(15);
  if (q + kPrefetch < pf_end) {
    _mm_prefetch(reinterpret_cast<const char*>(q + kPrefetch), _MM_HINT_T0);
    for (int i = 64; i < 512; i += 64) _mm_prefetch(reinterpret_cast<const char*>(q + kPrefetch + i), _MM_HINT_T0);
  }
  for (int row = 0; row < 32; ++row) {  // 16 tile rows per B tile, 2 tiles
    const int h = row >> 4;
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + row * 16)));
    const __m512 a = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(v, low4), zoff[2 * h]));
    const __m512 b = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(v, 4), zoff[2 * h + 1]));
    _mm512_store_si512(out + row * 32, (__m512i)_mm512_cvtne2ps_pbh(b, a));
  }
}

bool amx_init() {
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

// What the driver streams: a bf16 weight, int8 codes with per-column scales, or group-wise int4 codes
// with per-group column scales and optional zero points (all in tile order, see amx_linear.py).
struct Weights {
  enum Kind { kBf16, kInt8, kInt4 } kind;
  const void* data;
  const float* scales = nullptr;  // int8: [N]; int4: [N/32, G, 32]
  const int8_t* zoff = nullptr;   // int4: [N/32, G, 64] z + 8 in lane order, or null (symmetric: 8)
  int64_t group_steps = 0;        // int4: k steps per group (group size / 32)
};

static at::Tensor run(const at::Tensor& x_in, const Weights& wt, int64_t N, const c10::optional<at::Tensor>& bias_in) {
  const int64_t K = x_in.size(-1);
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  if (has_bias) TORCH_CHECK(bias_in->numel() == N, "amx_linear: bias must have N elements");
  const bool flat = x_in.dim() == 2;
  const int64_t M = x_in.numel() / std::max<int64_t>(K, 1);
  const at::Tensor x = flat ? x_in.contiguous() : x_in.reshape({M, K}).contiguous();
  const at::Tensor bias = has_bias ? bias_in->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, N}, x.options());
  if (M > 0 && N > 0) {
    const bf16* xp = reinterpret_cast<const bf16*>(x.data_ptr<at::BFloat16>());
    const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
    bf16* yp = reinterpret_cast<bf16*>(y.data_ptr<at::BFloat16>());
    const int64_t nblocks = N / 32, kblocks = K / 32;
    const int64_t step_bytes = wt.kind == Weights::kBf16 ? 2048 : wt.kind == Weights::kInt8 ? 1024 : 512;
    const int64_t block_bytes = kblocks * step_bytes;
    const int64_t group_steps = wt.kind == Weights::kInt4 ? wt.group_steps : kblocks;
    const int64_t groups = kblocks / group_steps;
    const char* base = static_cast<const char*>(wt.data);
    const int nt = static_cast<int>(std::min<int64_t>(std::max(1, at::get_num_threads()), nblocks));
#pragma omp parallel num_threads(nt)
    {
      const int t = omp_get_thread_num(), T = omp_get_num_threads();
      const int64_t b0 = nblocks * t / T, b1 = nblocks * (t + 1) / T;
      const char* pf_end = base + b1 * block_bytes;
      // Codes are widened to bf16 per k step into two alternating 2 KiB buffers when the rows fit one pass
      // (the widening of step k+1 overlaps step k's tiles), else once per column block for all passes.
      const bool one_pass = M <= 32;
      bf16* widened = wt.kind == Weights::kBf16 ? nullptr
          : static_cast<bf16*>(std::aligned_alloc(64, (one_pass ? 2048 : kblocks * 1024) * sizeof(bf16)));
      alignas(64) float c[32 * 32];
      alignas(64) float total[32 * 32];
      __m512i zoff[4];
      int configured = -1;  // rows of the current configuration (rows_a * 64 + rows_b)
      for (int64_t nb = b0; nb < b1; ++nb) {
        const char* wb = base + nb * block_bytes;
        auto set_zoff = [&](int64_t g) {  // int4: the group's zero offsets for this column block
          for (int i = 0; i < 4; ++i)
            zoff[i] = wt.zoff ? _mm512_cvtepi8_epi32(_mm_loadu_si128(
                                    reinterpret_cast<const __m128i*>(wt.zoff + (nb * groups + g) * 64 + 16 * i)))
                              : _mm512_set1_epi32(8);
        };
        auto widen = [&](int64_t kb, bf16* out) {
          if (wt.kind == Weights::kInt8) {
            widen_step(reinterpret_cast<const int8_t*>(wb) + kb * 1024, reinterpret_cast<const int8_t*>(pf_end), out);
          } else {
            if (kb % group_steps == 0) set_zoff(kb / group_steps);
            widen_step_int4(reinterpret_cast<const uint8_t*>(wb) + kb * 512, reinterpret_cast<const uint8_t*>(pf_end),
                            zoff, out);
          }
        };
        if (widened && !one_pass)
          for (int64_t kb = 0; kb < kblocks; ++kb) widen(kb, widened + kb * 1024);
        auto b_tiles = [&](int64_t kb) -> const char* {
          if (!widened) {  // bf16: straight from the packed weight
            const char* w = wb + kb * 2 * kTileBytes;
            if (w + kPrefetch < pf_end) prefetch_span(w + kPrefetch);
            return w;
          }
          if (!one_pass) return reinterpret_cast<const char*>(widened + kb * 1024);
          bf16* buf = widened + (kb & 1) * 1024;
          widen(kb, buf);
          return reinterpret_cast<const char*>(buf);
        };
        for (int64_t m0 = 0; m0 < M; m0 += 32) {
          const int rows = static_cast<int>(std::min<int64_t>(32, M - m0));
          const int ra = std::min(rows, 16), rb = rows - ra;
          if (configured != ra * 64 + rb) {
            configure(ra, rb);
            configured = ra * 64 + rb;
          }
          const float* out = c;
          for (int64_t g = 0; g < groups; ++g) {
            if (rb) block<true>(xp + m0 * K, K, g * group_steps, (g + 1) * group_steps, b_tiles, c);
            else block<false>(xp + m0 * K, K, g * group_steps, (g + 1) * group_steps, b_tiles, c);
            if (wt.kind == Weights::kInt4) {
              accumulate_group(c, rows, wt.scales + (nb * groups + g) * 32, g == 0, total);
              out = total;
            }
          }
          const float* scale32 = wt.kind == Weights::kInt8 ? wt.scales + nb * 32 : nullptr;
          epilogue(out, rows, scale32, bp ? bp + nb * 32 : nullptr, yp + m0 * N + nb * 32, N);
        }
      }
      _tile_release();
      std::free(widened);
    }
  }
  if (flat) return y;
  auto out_sizes = x_in.sizes().vec();
  out_sizes.back() = N;
  return y.view(out_sizes);
}

static void check_x(const at::Tensor& x, const at::Tensor& packed, int64_t N, int64_t values_per_element) {
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "amx_linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "amx_linear: x must be bfloat16");
  const int64_t K = x.size(-1);
  TORCH_CHECK(N % 32 == 0 && K % 32 == 0 && packed.numel() * values_per_element == N * K && packed.is_contiguous(),
              "amx_linear: the packed weight must hold N x K values with N and K multiples of 32");
}

at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& packed, int64_t N,
                      const c10::optional<at::Tensor>& bias) {
  check_x(x, packed, N, 1);
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16, "amx_linear: the packed weight must be bfloat16");
  return run(x, Weights{Weights::kBf16, packed.data_ptr()}, N, bias);
}

at::Tensor amx_int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                           const c10::optional<at::Tensor>& bias) {
  const int64_t N = scales.numel();
  check_x(x, packed, N, 1);
  TORCH_CHECK(packed.scalar_type() == at::kChar, "amx_int8_linear: the packed weight must be int8");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous(),
              "amx_int8_linear: scales must be contiguous float32 [N]");
  return run(x, Weights{Weights::kInt8, packed.data_ptr(), scales.data_ptr<float>()}, N, bias);
}

at::Tensor amx_int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                           const c10::optional<at::Tensor>& zoff, int64_t group_size,
                           const c10::optional<at::Tensor>& bias) {
  const int64_t K = x.size(-1);
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && K % group_size == 0,
              "amx_int4_linear: the group size must be a multiple of 32 dividing K");
  TORCH_CHECK(scales.dim() == 3 && scales.size(2) == 32 && scales.size(1) == K / group_size &&
                  scales.scalar_type() == at::kFloat && scales.is_contiguous(),
              "amx_int4_linear: scales must be contiguous float32 [N / 32, K / group, 32]");
  const int64_t N = scales.size(0) * 32;
  check_x(x, packed, N, 2);
  TORCH_CHECK(packed.scalar_type() == at::kByte, "amx_int4_linear: the packed codes must be uint8");
  const bool has_z = zoff.has_value() && zoff->defined();
  if (has_z)
    TORCH_CHECK(zoff->scalar_type() == at::kChar && zoff->is_contiguous() && zoff->numel() == scales.numel() * 2,
                "amx_int4_linear: zero offsets must be contiguous int8 [N / 32, K / group, 64]");
  return run(x, Weights{Weights::kInt4, packed.data_ptr(), scales.data_ptr<float>(),
                        has_z ? zoff->data_ptr<int8_t>() : nullptr, group_size / 32},
             N, bias);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("amx_init", &amx_init, "ask Linux for AMX tile state (once per process); False when refused");
  m.def("amx_linear", &amx_linear, "y = x @ W^T (+ bias) from a packed bf16 weight: bf16 in/out, fp32 accumulation",
        py::arg("x"), py::arg("packed"), py::arg("n"), py::arg("bias") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("amx_int8_linear", &amx_int8_linear,
        "y = (x @ Q^T) * scales (+ bias) from packed int8 codes: bf16 in/out, fp32 accumulation",
        py::arg("x"), py::arg("packed"), py::arg("scales"), py::arg("bias") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("amx_int4_linear", &amx_int4_linear,
        "y = x @ ((Q - Z) * S)^T (+ bias) from packed group-wise int4 codes: bf16 in/out, fp32 accumulation",
        py::arg("x"), py::arg("packed"), py::arg("scales"), py::arg("zoff"), py::arg("group_size"),
        py::arg("bias") = py::none(), py::call_guard<py::gil_scoped_release>());
}
