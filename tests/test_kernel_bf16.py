"""kiln_bf16.h, the bf16 <-> fp32 conversions every CPU kernel shares, against torch's own conversion.

A probe extension includes the header the way the kernels do (from the include path LazyExtension gives
every build, so the header is found from any source folder) and converts with the scalar and the AVX-512
variants. Inputs: every bf16 bit pattern with low halves that are exact, just below, exactly at and just
above the rounding midpoint (ties to even both ways, carries into the exponent, overflow to Inf), NaNs with
payloads and either sign, infinities, zeros, fp32 and bf16 denormals, plus random values. Then the same
values through two production kernels (int8_dequantize to bf16, the residual add of add_rms_norm).
"""

from __future__ import annotations

import pytest
import torch

from engines.torch.kernels import int_linear, rms_norm
from engines.torch.kernels.extension import LazyExtension, cpu_flags
from tests.isa_helpers import force_level, levels_here

PROBE = r"""
#include "kiln_torch.h"

#include "kiln_bf16.h"

torch::Tensor scalar_to_bf16(torch::Tensor x) {  // fp32 -> bf16 bits (int16)
  auto y = torch::empty(x.sizes(), x.options().dtype(torch::kInt16));
  const float* p = x.data_ptr<float>();
  int16_t* q = y.data_ptr<int16_t>();
  for (int64_t i = 0; i < x.numel(); ++i) q[i] = static_cast<int16_t>(kiln::float_to_bf16(p[i]));
  return y;
}

torch::Tensor scalar_to_float(torch::Tensor b) {  // bf16 bits (int16) -> fp32
  auto y = torch::empty(b.sizes(), b.options().dtype(torch::kFloat32));
  const uint16_t* p = reinterpret_cast<const uint16_t*>(b.data_ptr<int16_t>());
  float* q = y.data_ptr<float>();
  for (int64_t i = 0; i < b.numel(); ++i) q[i] = kiln::bf16_to_float(p[i]);
  return y;
}

KILN_AVX512 void vector_to_bf16_impl(const float* p, uint16_t* q, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm256_mask_storeu_epi16(q + i, m, _mm512_cvtepi32_epi16(kiln::to_bf16_bits(_mm512_maskz_loadu_ps(m, p + i))));
  }
}

KILN_AVX512 void vector_to_float_impl(const uint16_t* p, float* q, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(q + i, m, kiln::widen16(p + i, m));
  }
}

torch::Tensor vector_to_bf16(torch::Tensor x) {
  auto y = torch::empty(x.sizes(), x.options().dtype(torch::kInt16));
  vector_to_bf16_impl(x.data_ptr<float>(), reinterpret_cast<uint16_t*>(y.data_ptr<int16_t>()), x.numel());
  return y;
}

torch::Tensor vector_to_float(torch::Tensor b) {
  auto y = torch::empty(b.sizes(), b.options().dtype(torch::kFloat32));
  vector_to_float_impl(reinterpret_cast<const uint16_t*>(b.data_ptr<int16_t>()), y.data_ptr<float>(), b.numel());
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scalar_to_bf16", &scalar_to_bf16);
  m.def("scalar_to_float", &scalar_to_float);
  m.def("vector_to_bf16", &vector_to_bf16);
  m.def("vector_to_float", &vector_to_float);
}
"""

AVX512 = {"avx512f", "avx512bw", "avx512vl"} <= cpu_flags()


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    source = tmp_path_factory.mktemp("bf16_probe") / "bf16_probe.cpp"  # not beside the header on purpose
    source.write_text(PROBE)
    module = LazyExtension("kiln_test_bf16_probe", source, ["-O2", "-std=c++17"]).get()
    if module is None:
        pytest.skip("no C++ toolchain for the probe extension")
    return module


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)


def _fp32_values() -> torch.Tensor:
    """fp32 values (as a float32 tensor) covering every bf16 pattern with critical low halves, plus NaN
    payloads, infinities, zeros, denormals and random values."""
    high = torch.arange(1 << 16, dtype=torch.int64) << 16
    lows = torch.tensor([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=torch.int64)
    patterns = (high[:, None] | lows[None, :]).flatten()
    specials = torch.tensor(
        [
            0x7FC00000,
            0xFFC00000,
            0x7F800001,
            0xFF800001,
            0x7FA12345,
            0xFFFFFFFF,
            0x7FFFFFFF,
            0x7F800000,
            0xFF800000,
            0,
            0x80000000,
            1,
            0x80000001,
            0x007FFFFF,
            0x00008000,
            0x00018000,
            0x7F7F8000,
            0x7F7F7FFF,
            0xFF7F8000,
        ],
        dtype=torch.int64,
    )
    random = torch.randint(0, 1 << 32, (100_000,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    all_bits = torch.cat([patterns, specials, random])
    return all_bits.to(torch.int32).view(torch.float32)  # int64 -> int32 keeps the low 32 bits


def _torch_bf16_bits(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).view(torch.int16)


def test_values_cover_the_hard_cases():
    x = _fp32_values()
    assert torch.isnan(x).any() and torch.isinf(x).any()
    assert ((x != 0) & (x.abs() < torch.finfo(torch.float32).tiny)).any()  # fp32 denormals
    ties = (_bits(x) & 0xFFFF) == 0x8000
    assert ties.sum() > 60_000 and torch.isinf(x[ties].to(torch.bfloat16).float()).any()  # max finite tie -> Inf


def test_scalar_matches_torch(probe):
    x = _fp32_values()
    assert torch.equal(probe.scalar_to_bf16(x), _torch_bf16_bits(x))


@pytest.mark.skipif(not AVX512, reason="the CPU lacks AVX-512 F/BW/VL")
def test_vector_matches_torch(probe):
    x = _fp32_values()
    assert torch.equal(probe.vector_to_bf16(x), _torch_bf16_bits(x))
    assert torch.equal(probe.vector_to_bf16(x[:37]), _torch_bf16_bits(x[:37]))  # a masked tail


def test_widening_matches_torch(probe):
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16)  # every bf16 bit pattern
    expected = _bits(every.view(torch.bfloat16).float())
    assert torch.equal(_bits(probe.scalar_to_float(every)), expected)
    if AVX512:
        assert torch.equal(_bits(probe.vector_to_float(every)), expected)


def test_nan_has_one_encoding(probe):
    nans = torch.tensor([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFA12345], dtype=torch.int64).to(torch.int32)
    nans = nans.view(torch.float32)
    expected = torch.full((4,), -1, dtype=torch.int16)  # 0xFFFF, torch's vectorised encoding
    assert torch.equal(_torch_bf16_bits(nans), expected)
    assert torch.equal(probe.scalar_to_bf16(nans), expected)


@pytest.mark.skipif(not int_linear.available(), reason="int_gemv kernel unavailable")
def test_int8_dequantize_rounds_like_torch():
    """int8_dequantize to bf16 of codes 1: each row is its scale converted by the kernel's epilogue."""
    scales = _fp32_values()[::7].contiguous()
    codes = torch.ones(scales.numel(), 16, dtype=torch.int8)
    out = int_linear.int8_dequantize(codes, scales, torch.bfloat16)
    expected = (codes.float() * scales[:, None]).to(torch.bfloat16)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


@pytest.mark.skipif(not rms_norm.available(), reason="rms_norm kernel unavailable")
@pytest.mark.parametrize("level", levels_here())
def test_residual_add_rounds_like_torch(level, monkeypatch):
    """add_rms_norm's sum is torch's bf16 add: ties (1 + 2**-8), overflow to Inf, Inf - Inf = NaN, denormals;
    at every ISA level (the AVX2 build rounds with its own 8-lane code in kiln_simd.h)."""
    force_level(monkeypatch, rms_norm._EXT, level)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 64, generator=g).bfloat16()
    d = torch.randn(4, 64, generator=g).bfloat16()
    x[0, :8] = torch.tensor([1.0, 1.0 + 2**-7, 3.3895e38, float("inf"), float("nan"), 1e-40, -1e-40, 2.0])
    d[0, :8] = torch.tensor([2**-8, 2**-8, 3.3895e38, float("-inf"), 1.0, 1e-40, 5e-41, -2.0])
    total, _ = rms_norm.add_rms_norm(x, d, torch.ones(64, dtype=torch.bfloat16), 1e-5)
    assert torch.equal(total.view(torch.int16), (x + d).view(torch.int16))
