"""engines/torch/kernels/amx_linear: the packed layout, agreement with an fp32 reference within one bf16
rounding for SmolLM2's shapes at every row count that exercises a different tile shape, determinism
and batch / thread invariance, coexistence with oneDNN's AMX kernels in the same threads, GIL release,
DenseLinear's dispatch, and the fallback where the CPU has no AMX.

Skipped (except the fallback test) when the kernel is unavailable: no AMX (AMD, older Intel), Linux
refusing AMX state, or no compiler / ninja."""

from __future__ import annotations

import pytest
import torch

from engines.torch.kernels import amx_linear as kmod
from engines.torch.kernels import extension
from engines.torch.layers.linear import DenseLinear, LinearDispatch
from tests.gil_helpers import assert_releases_gil
from tests.linear_helpers import bf16_inputs, check_bf16_linear

SMOLLM2_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o_proj, gate_up, down (N, K)
# 1..16 rows: one A tile; 17..32: two; above 32: chunks of 32 with a tail of either kind
ROW_COUNTS = [1, 2, 7, 15, 16, 17, 31, 32, 33, 48, 49, 64, 100]

needs_amx = pytest.mark.skipif(not kmod.available(), reason="AMX kernel unavailable (no AMX, no compiler or ninja)")


def test_pack_layout_and_fits():
    n, k = 64, 96
    w = torch.randn(n, k).bfloat16()
    p = kmod.pack(w)
    assert p.shape == (n // 32, k // 32, 2, 16, 16, 2) and p.is_contiguous()
    for nb, kb, h, pr, col, e in [(0, 0, 0, 0, 0, 1), (1, 2, 1, 15, 15, 1), (0, 1, 1, 3, 7, 0), (1, 0, 0, 9, 2, 1)]:
        assert torch.equal(p[nb, kb, h, pr, col, e], w[32 * nb + 16 * h + col, 32 * kb + 2 * pr + e])
    assert kmod.fits(w) and not kmod.fits(w.float()) and not kmod.fits(w[:48]) and not kmod.fits(w[:, :80])
    with pytest.raises(ValueError, match="multiples of 32"):
        kmod.pack(w[:, :80])


@needs_amx
@pytest.mark.parametrize("n,k", SMOLLM2_SHAPES + [(32, 32), (96, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_fp32_reference(n, k, bias):
    for m in ROW_COUNTS:
        x, w, b = bf16_inputs(m, n, k, seed=m * 1000 + n + k, bias=bias)
        check_bf16_linear(kmod.amx_linear(x, kmod.pack(w), b), x, w, b)


@needs_amx
def test_lm_head_shape_leading_dims_and_empty():
    x, w, _ = bf16_inputs(32, 49152, 576, seed=1, bias=False)
    packed = kmod.pack(w)
    y = kmod.amx_linear(x, packed)
    check_bf16_linear(y, x, w, None)
    assert torch.equal(kmod.amx_linear(x.view(4, 8, 576), packed).view(32, 49152), y)
    assert kmod.amx_linear(x[:0], packed).shape == (0, 49152)


@needs_amx
def test_deterministic_batch_and_thread_invariant():
    x, w, b = bf16_inputs(70, 3072, 576, seed=7, bias=True)
    packed = kmod.pack(w)
    y = kmod.amx_linear(x, packed, b)
    assert torch.equal(kmod.amx_linear(x, packed, b), y)
    for i in (0, 15, 16, 31, 32, 69):  # each row: one fixed-order sum, whichever tile and chunk it lands in
        assert torch.equal(kmod.amx_linear(x[i : i + 1], packed, b), y[i : i + 1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(kmod.amx_linear(x, packed, b), y)
    finally:
        torch.set_num_threads(threads)


@needs_amx
def test_coexists_with_onednn_amx_in_the_same_threads():
    # oneDNN configures AMX tiles its own way in the same OpenMP threads: alternating calls must not
    # disturb each other (each kiln call loads its own configuration and releases the tiles).
    x, w, b = bf16_inputs(24, 576, 1536, seed=11, bias=True)
    packed = kmod.pack(w)
    y = kmod.amx_linear(x, packed, b)
    big = torch.randn(512, 512).bfloat16()
    ref_big = big @ big
    for _ in range(3):
        assert torch.equal(big @ big, ref_big)
        assert torch.equal(kmod.amx_linear(x, packed, b), y)


@needs_amx
def test_releases_the_gil():
    x, w, _ = bf16_inputs(32, 49152, 1536, seed=3, bias=False)
    packed = kmod.pack(w)
    assert_releases_gil(lambda: kmod.amx_linear(x, packed))


@needs_amx
def test_dense_linear_runs_amx_up_to_max_rows_and_onednn_above():
    dispatch = LinearDispatch(torch.bfloat16, torch.device("cpu"))
    assert dispatch.amx
    x, w, b = bf16_inputs(kmod.MAX_ROWS + 8, 576, 576, seed=5, bias=True)
    layer = DenseLinear(w, b, dispatch)
    assert layer.amx_packed is not None and layer.packed is None  # one packed copy, not two
    for m in (1, 9, 32, kmod.MAX_ROWS):
        assert torch.equal(layer(x[:m]), kmod.amx_linear(x[:m], layer.amx_packed, b))
    check_bf16_linear(layer(x), x, w, b)  # above MAX_ROWS: F.linear
    odd = DenseLinear(bf16_inputs(1, 40, 576, seed=6, bias=False)[1], None, dispatch)  # N = 40: not for AMX
    assert odd.amx_packed is None and odd.packed is not None
    check_bf16_linear(odd(x[:20]), x[:20], odd.weight.data, None)


def test_fallback_and_no_raise_when_unavailable(monkeypatch, caplog, kernels_decide_again):
    monkeypatch.setattr(extension, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    with caplog.at_level("WARNING", logger="kiln.kernels"):
        assert kmod.available() is False
    assert len(caplog.records) == 1 and "amx_tile" in caplog.records[0].getMessage()
    dispatch = LinearDispatch(torch.bfloat16, torch.device("cpu"))
    x, w, b = bf16_inputs(20, 64, 96, seed=5, bias=True)
    layer = DenseLinear(w, b, dispatch)
    assert not dispatch.amx and layer.amx_packed is None
    check_bf16_linear(layer(x), x, w, b)


def _int8_inputs(m: int, n: int, k: int, seed: int, bias: bool):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).bfloat16()
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    s = torch.rand(n, generator=g) * 1e-3 + 1e-4
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    return x, q, s, b


@needs_amx
@pytest.mark.parametrize("n,k", SMOLLM2_SHAPES + [(32, 32)])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_matches_fp32_reference(n, k, bias):
    for m in ROW_COUNTS:
        x, q, s, b = _int8_inputs(m, n, k, seed=m * 1000 + n + k, bias=bias)
        y = kmod.amx_int8_linear(x, kmod.pack(q), s, b)
        check_bf16_linear(y, x, q.float() * s.reshape(-1, 1), b)  # the dequantized weight, in fp32


@needs_amx
def test_int8_batch_invariant_and_int8_layer_dispatch():
    from engines.quant.types import QuantizedWeight
    from engines.torch.layers.quantized import AMX_INT8_MIN_ROWS, Int8WeightOnlyLinear, W8A8Int8Linear

    x, q, s, b = _int8_inputs(70, 576, 1536, seed=9, bias=True)
    packed = kmod.pack(q)
    y = kmod.amx_int8_linear(x, packed, s, b)
    for i in (0, 16, 33, 69):
        assert torch.equal(kmod.amx_int8_linear(x[i : i + 1], packed, s, b), y[i : i + 1])
    layer = Int8WeightOnlyLinear.from_quantized(QuantizedWeight(q, s.reshape(-1, 1), None, 8, None, True), b)
    assert layer.amx_packed is not None and torch.equal(layer.amx_packed, packed)
    for m in (AMX_INT8_MIN_ROWS, 32, 70):
        assert torch.equal(layer(x[:m]), y[:m])
    small = layer(x[: AMX_INT8_MIN_ROWS - 1])  # below: kiln's AVX-512 kernel, same values up to rounding
    check_bf16_linear(small, x[: AMX_INT8_MIN_ROWS - 1], q.float() * s.reshape(-1, 1), b)
    assert layer(x.float()[:32]).dtype == torch.float32  # fp32 activations never take the bf16 kernel
    # SmoothQuant layers run the same W8A16 path on AMX (exact activations instead of int8 ones)
    sq = W8A8Int8Linear.from_quantized(q, s, b)
    assert sq.amx_packed is not None
    for m in (AMX_INT8_MIN_ROWS, 32, 70):
        assert torch.equal(sq(x[:m]), y[:m])


def _int4_weight(n: int, k: int, group: int, symmetric: bool, seed: int):
    from engines.quant.rtn import quantize_rtn

    g = torch.Generator().manual_seed(seed)
    return quantize_rtn(torch.randn(n, k, generator=g) * 0.05, 4, group_size=group, symmetric=symmetric)


def test_int4_pack_layout():
    qw = _int4_weight(64, 128, 64, symmetric=False, seed=2)
    packed, scales_t, zoff = kmod.pack_int4(qw.qweight, qw.scales, qw.zeros, 64)
    rows = kmod.pack(qw.qweight).view(2, 4, 32, 32)  # the codes in tile order: [nb, kb, tile row, lane]
    assert torch.equal((packed & 15).to(torch.int16) - 8, rows[..., :16].to(torch.int16))
    assert torch.equal((packed >> 4).to(torch.int16) - 8, rows[..., 16:].to(torch.int16))
    assert torch.equal(scales_t[1, 0], qw.scales[32:64, 0]) and torch.equal(scales_t[0, 1], qw.scales[:32, 1])
    # lane j of B tile h holds column 16 h + j // 2
    assert zoff[1, 1, 32 + 5].item() == qw.zeros[32 + 16 + 2, 1].item() + 8
    assert kmod.pack_int4(qw.qweight, qw.scales, None, 64)[2] is None
    assert not kmod.int4_fits(64, 128, 16) and not kmod.int4_fits(64, 96, 64) and kmod.int4_fits(64, 128, 128)


@needs_amx
@pytest.mark.parametrize("n,k,group", [(960, 576, 64), (576, 1536, 128), (3072, 576, 32), (64, 64, 64)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_matches_fp32_reference(n, k, group, symmetric):
    from engines.quant.rtn import dequantize

    qw = _int4_weight(n, k, group, symmetric, seed=n + k + group)
    args = kmod.pack_int4(qw.qweight, qw.scales, qw.zeros, group)
    w = dequantize(qw).float()
    for m in ROW_COUNTS:
        g = torch.Generator().manual_seed(m)
        x = torch.randn(m, k, generator=g).bfloat16()
        b = torch.randn(n, generator=g).bfloat16()
        check_bf16_linear(kmod.amx_int4_linear(x, *args, group, b), x, w, b)


@needs_amx
def test_int4_layer_dispatch_batch_invariance_and_act_order():
    from engines.quant.rtn import dequantize
    from engines.quant.types import QuantizedWeight
    from engines.torch.layers.quantized import AMX_INT8_MIN_ROWS, Int4WeightOnlyLinear

    qw = _int4_weight(576, 1536, 128, symmetric=False, seed=4)
    x = torch.randn(70, 1536).bfloat16()
    layer = Int4WeightOnlyLinear.from_quantized(qw)
    assert layer.amx is not None
    y = layer(x)
    check_bf16_linear(y, x, dequantize(qw).float(), None)
    for i in (0, 17, 69):
        assert torch.equal(kmod.amx_int4_linear(x[i : i + 1], *layer.amx, 128), y[i : i + 1])
    for m in (AMX_INT8_MIN_ROWS, 32):
        assert torch.equal(layer(x[:m]), y[:m])
    # GPTQ act-order: columns stored in group order, x gathered by the layer's permutation
    perm = torch.randperm(1536, generator=torch.Generator().manual_seed(1))
    g_idx = torch.empty(1536, dtype=torch.int32)
    g_idx[perm] = (torch.arange(1536) // 128).to(torch.int32)  # column perm[i] is in group i // 128
    shuffled = QuantizedWeight(qw.qweight[:, torch.argsort(perm)], qw.scales, qw.zeros, 4, 128, False, g_idx)
    ordered = Int4WeightOnlyLinear.from_quantized(shuffled)
    assert ordered.perm is not None and ordered.amx is not None
    check_bf16_linear(ordered(x[:32]), x[:32], dequantize(shuffled).float(), None)
