"""Quantized runtime linear layers vs F.linear on the dequantized weight (tight) and the float weight (loose)."""

import pytest
import torch
import torch.nn.functional as F

from engines.quant.fp8 import quantize_fp8
from engines.quant.rtn import dequantize, pack_int4, quantize_rtn, unpack_int4
from engines.quant.smoothquant import quantize_w8a8
from engines.quant.types import QuantizedWeight
from engines.torch.layers.quantized import (
    INT_MM_MAX_ROWS,
    Fp8Linear,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    W8A8Int8Linear,
    fp8_upcast_linear,
    int4_to_torch_cpu_format,
    int4_weight_only_fallback,
    int8_weight_only_fallback,
    w8a8_fallback,
)
from tests.quant_reference import dequantize_fp8, w8a8_linear_reference

MS = (1, 7, 32)
KS = (576, 1536)
NS = (576, 960)
DTYPES = (torch.float32, torch.bfloat16)
TIGHT = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    # max abs error relative to the output's max magnitude (robust for near-zero entries)
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-6))


def _data(m, k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(m, k, generator=g)
    return x, w


def _check(y, x, w_deq, w_float, dtype, loose):
    assert y.dtype == dtype and y.shape == (x.shape[0], w_deq.shape[0])
    ref_deq = F.linear(x.float(), w_deq.float())  # exact-ish reference in fp32 on the dequantized weight
    assert _rel_err(y, ref_deq) < TIGHT[dtype]
    ref_float = F.linear(x.float(), w_float.float())
    assert _rel_err(y, ref_float) < loose


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("m", MS)
def test_int8_weight_only(m, k, n, dtype):
    x, w = _data(m, k, n)
    qw = quantize_rtn(w, 8)
    layer = Int8WeightOnlyLinear.from_quantized(qw)
    xd = x.to(dtype)
    y = layer(xd)
    _check(y, xd, dequantize(qw), w, dtype, loose=2e-2)
    yf = int8_weight_only_fallback(xd, layer.qweight, layer.scales)
    _check(yf, xd, dequantize(qw), w, dtype, loose=2e-2)
    assert layer.weight_bytes == n * k + n * 4


def test_int8_weight_only_leading_dims_and_bias():
    x, w = _data(6, 576, 576)
    b = torch.randn(576)
    qw = quantize_rtn(w, 8)
    layer = Int8WeightOnlyLinear.from_quantized(qw, bias=b)
    y = layer(x.reshape(2, 3, 576))
    ref = F.linear(x, dequantize(qw), b).reshape(2, 3, 576)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", (True, False))
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("k,g", [(k, g) for k in KS for g in (32, 64, 128) if k % g == 0])  # groups divide K
@pytest.mark.parametrize("m", MS)
def test_int4_weight_only(m, k, n, g, symmetric, dtype):
    x, w = _data(m, k, n)
    qw = quantize_rtn(w, 4, group_size=g, symmetric=symmetric)
    layer = Int4WeightOnlyLinear.from_quantized(qw)
    xd = x.to(dtype)
    y = layer(xd)
    _check(y, xd, dequantize(qw), w, dtype, loose=0.2)
    yf = int4_weight_only_fallback(xd, qw)
    _check(yf, xd, dequantize(qw), w, dtype, loose=0.2)


@pytest.mark.parametrize("symmetric", (True, False))
@pytest.mark.parametrize("g", (32, 64, 128))
def test_int4_repack_round_trip_exact(g, symmetric):
    """portable packed -> codes -> torch format: torch's dequant formula gives dequantize() exactly."""
    _, w = _data(1, 1536, 960, seed=1)
    qw = quantize_rtn(w, 4, group_size=g, symmetric=symmetric)
    packed = pack_int4(qw.qweight)
    codes = unpack_int4(packed, signed=True)
    assert torch.equal(codes, qw.qweight)
    u, sz = int4_to_torch_cpu_format(QuantizedWeight(codes, qw.scales, qw.zeros, 4, g, symmetric))
    assert u.dtype == torch.int32 and int(u.min()) >= 0 and int(u.max()) <= 15
    assert torch.equal(u - 8, qw.qweight.to(torch.int32))
    scale = sz[..., 0].t().repeat_interleave(g, 1)  # [N, K]
    zero = sz[..., 1].t().repeat_interleave(g, 1)
    torch_deq = (u.float() - 8) * scale + zero
    torch.testing.assert_close(torch_deq, dequantize(qw), rtol=0, atol=1e-6)
    # and the kernel itself (fp32) on identity input reproduces the dequantized weight columns
    layer = Int4WeightOnlyLinear(QuantizedWeight(codes, qw.scales, qw.zeros, 4, g, symmetric))
    eye = torch.eye(1536)[:64]
    torch.testing.assert_close(layer(eye), dequantize(qw)[:, :64].t(), rtol=0, atol=1e-6)


def test_int4_act_order_g_idx():
    x, w = _data(7, 576, 576, seed=2)
    g = 64
    perm = torch.randperm(576, generator=torch.Generator().manual_seed(3))
    # quantize columns in permuted order, then express it with g_idx on the original column order
    qp = quantize_rtn(w[:, perm], 4, group_size=g, symmetric=False)
    inv = torch.argsort(perm)
    g_idx = (inv // g).to(torch.int32)  # column c sits at position inv[c] in the permuted order
    qw = QuantizedWeight(qp.qweight[:, inv].contiguous(), qp.scales, qp.zeros, 4, g, False, g_idx)
    layer = Int4WeightOnlyLinear.from_quantized(qw)
    ref = F.linear(x, dequantize(qw))
    assert _rel_err(layer(x), ref) < 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("m", (*MS, INT_MM_MAX_ROWS + 72))
def test_w8a8(m, k, n, dtype):
    x, w = _data(m, k, n)
    q, s = quantize_w8a8(w)
    layer = W8A8Int8Linear.from_quantized(q, s)
    xd = x.to(dtype)
    y = layer(xd)
    ref = w8a8_linear_reference(xd, q, s)  # same integer math: matches to output rounding
    assert y.dtype == dtype
    if m <= layer.small_m_max or (layer.small_m_max and m > INT_MM_MAX_ROWS):
        # decode-sized (kiln's W8A16 kernel) or prefill-sized (dequantized weight, one GEMM): activations exact
        assert _rel_err(y, F.linear(xd.float(), q.float() * s[:, None])) < TIGHT[dtype]
    else:
        assert _rel_err(y, ref) < TIGHT[dtype]
    yf = w8a8_fallback(xd, q, s)
    assert _rel_err(yf, ref) < TIGHT[dtype]
    # vs the dequantized weight: activation quantization error remains (per-token int8 ≈ 1%)
    assert _rel_err(y, F.linear(xd.float(), q.float() * s[:, None])) < 3e-2
    assert _rel_err(y, F.linear(xd.float(), w)) < 4e-2


def test_w8a8_from_quantized_weight():
    x, w = _data(32, 576, 960)
    qw = quantize_rtn(w, 8)
    layer = W8A8Int8Linear.from_quantized(qw)
    ref = w8a8_linear_reference(x, qw.qweight, qw.scales.reshape(-1))
    assert layer.small_m_max < 32  # 32 rows: the W8A8 path
    assert _rel_err(layer(x), ref) < 1e-5


@pytest.mark.parametrize("per_channel", (True, False))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("m", MS)
def test_fp8(m, k, n, dtype, per_channel):
    x, w = _data(m, k, n)
    wq, s = quantize_fp8(w, per_channel=per_channel)
    layer = Fp8Linear.from_quantized(wq, s)
    xd = x.to(dtype)
    y = layer(xd)
    _check(y, xd, dequantize_fp8(wq, s), w, dtype, loose=0.1)
    yf = fp8_upcast_linear(xd, wq, s)
    _check(yf, xd, dequantize_fp8(wq, s), w, dtype, loose=0.1)
    assert layer.weight_bytes == n * k + s.numel() * 4


def test_fp8_bit_cast_exact():
    from engines.torch.layers.quantized import fp8_e4m3_to_scaled

    allb = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    ok = ~torch.isnan(allb.float())
    for dtype in DTYPES:
        got = fp8_e4m3_to_scaled(allb, dtype)
        assert got.dtype == dtype
        assert torch.equal(got[ok].float(), allb.float()[ok] * 2.0**-8)


@pytest.mark.parametrize("m", (1, 32))
def test_in_layer_fallback_branches(m):
    """The layers' own non-kernel branches (taken when an op is missing) give the same results."""
    x, w = _data(m, 576, 960)
    qw = quantize_rtn(w, 8)
    for layer in (Int8WeightOnlyLinear.from_quantized(qw), W8A8Int8Linear.from_quantized(qw)):
        y_kernel = layer(x)
        layer.use_kernel = False
        assert _rel_err(layer(x), y_kernel) < 1e-5
