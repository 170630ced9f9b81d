"""Fp8Linear's torch._scaled_mm path (fp8_scaled_mm_linear), which serves CUDA GPUs of SM >= 89, checked
on CPU: torch 2.13's CPU build implements _scaled_mm for float8_e4m3fn with the same scale pairings. Also
the CUDA shape/dtype rules that decide when the layer takes it (_scaled_mm_supported).

Shapes are small: on CPU a per-tensor _scaled_mm runs a slow reference loop (~2.5 s for 32x576x1536)."""

from __future__ import annotations

import pytest
import torch

from engines.quant.fp8 import quantize_fp8
from engines.torch.layers import quantized
from engines.torch.layers.quantized import (
    Fp8Linear,
    _cuda_scaled_mm_ok,
    _scaled_mm_supported,
    fp8_scaled_mm_linear,
    fp8_upcast_linear,
)
from tests.quant_reference import activation_scale, fp8_linear_reference, quantize_fp8_activation

K, N = 64, 48  # multiples of 16, as CUDA's _scaled_mm requires


def _data(m: int, per_channel: bool, with_bias: bool):
    torch.manual_seed(m)
    x = torch.randn(m, K)
    w = torch.randn(N, K) * torch.logspace(-1, 0, N).unsqueeze(1)  # rows of different magnitude
    wq, s = quantize_fp8(w, per_channel=per_channel)
    return x, wq, s, torch.randn(N) if with_bias else None


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("with_bias", (False, True))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
@pytest.mark.parametrize("per_channel", (True, False))
@pytest.mark.parametrize("m", (1, 17))
def test_scaled_mm_matches_upcast(m, per_channel, dtype, with_bias):
    x, wq, s, bias = _data(m, per_channel, with_bias)
    xd = x.to(dtype)
    y = fp8_scaled_mm_linear(xd, wq, s, bias)
    assert y.dtype == dtype and y.shape == (m, N)
    # Exact reference: the same activation quantization (per token with per-channel weights, else per
    # tensor), both fp8 operands upcast to fp32. Only the output rounding to `dtype` may differ.
    amax = xd.float().abs().amax(-1, keepdim=True) if per_channel else xd.float().abs().amax()
    exact = fp8_linear_reference(xd.float(), wq, s, activation_scale(amax))
    exact = exact if bias is None else exact + bias
    assert _rel(y, exact) < (4e-3 if dtype == torch.bfloat16 else 1e-6)
    # The CPU path (exact activations): the gap is _scaled_mm's fp8 rounding of x (3 mantissa bits).
    upcast = fp8_upcast_linear(xd, wq, s).float()
    upcast = upcast if bias is None else upcast + bias
    assert _rel(y, upcast) < 0.05


def test_layer_dispatches_to_scaled_mm_when_allowed(monkeypatch):
    """forward's scaled-mm branch (CUDA-only in use): leading dims kept, bias fused, same result."""
    x, wq, s, bias = _data(6, True, True)
    layer = Fp8Linear.from_quantized(wq, s, bias)
    x3 = x.to(torch.bfloat16).reshape(2, 3, K)
    monkeypatch.setattr(quantized, "_cuda_scaled_mm_ok", lambda *a: True)
    y = layer(x3)
    assert y.shape == (2, 3, N) and y.dtype == torch.bfloat16
    assert torch.equal(y.reshape(6, N), fp8_scaled_mm_linear(x3.reshape(6, K), wq, layer.w_scale, bias))


def test_cpu_keeps_the_upcast_path():
    x, wq, s, _ = _data(4, True, False)
    assert not _cuda_scaled_mm_ok(x, N, per_channel=True)
    assert torch.equal(Fp8Linear.from_quantized(wq, s)(x), fp8_upcast_linear(x, wq, s))


def test_scaled_mm_takes_only_matching_scale_pairings():
    """tests/quant_reference.py's fp8_linear_reference names _scaled_mm(x_fp8, w_fp8.t(), scale_a=x_scale,
    scale_b=w_scale.t()) as its production form. With a per-channel weight that call needs scale_a as a
    contiguous [M, 1] (row-wise): a 0-d static x_scale against a [1, N] scale_b is refused."""
    x, wq, s, _ = _data(5, True, False)
    x_scale = activation_scale(x.abs().amax())
    xq = quantize_fp8_activation(x, x_scale)
    with pytest.raises(ValueError, match="Invalid scaling configuration"):
        torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=s.t(), out_dtype=torch.float32)
    rows = x_scale.expand(5, 1).contiguous()
    y = torch._scaled_mm(xq, wq.t(), scale_a=rows, scale_b=s.t(), out_dtype=torch.float32)
    assert _rel(y, fp8_linear_reference(x, wq, s, x_scale)) < 1e-6


LLAMA_8B = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]  # (K, N): qkv, o, gate_up, down


@pytest.mark.parametrize("k, n", LLAMA_8B + [(576, 960), (576, 1536), (1536, 576)])  # + SmolLM2
def test_rules_accept_llama_and_smollm_shapes(k, n):
    bf16, fp16 = torch.bfloat16, torch.float16
    assert _scaled_mm_supported((9, 0), k, n, bf16, per_channel=True)
    assert _scaled_mm_supported((8, 9), k, n, bf16, per_channel=False)
    assert _scaled_mm_supported((8, 9), k, n, fp16, per_channel=False)
    assert not _scaled_mm_supported((8, 9), k, n, bf16, per_channel=True)  # row-wise: SM90+ only here
    assert not _scaled_mm_supported((9, 0), k, n, fp16, per_channel=True)  # row-wise CUTLASS: bf16 out only
    assert not _scaled_mm_supported((8, 6), k, n, bf16, per_channel=False)  # no FP8 tensor cores


@pytest.mark.parametrize("k, n", [(4104, 4096), (4096, 4104), (40, 48), (64, 24)])
def test_rules_need_k_and_n_multiple_of_16(k, n):
    # _scaled_mm_out_cuda: "Expected trailing dimension of mat1 to be divisible by 16" (K) and
    # "mat2 shape (K x N) must be divisible by 16" (K and N); M is free.
    for per_channel in (True, False):
        assert not _scaled_mm_supported((9, 0), k, n, torch.bfloat16, per_channel)


def test_rules_refuse_float32():
    # fp32 out cannot take a fused bias on CUDA ("Bias is not supported when out_dtype is set to Float32")
    for cap in ((8, 9), (9, 0), (10, 0)):
        assert not _scaled_mm_supported(cap, 4096, 4096, torch.float32, per_channel=False)
