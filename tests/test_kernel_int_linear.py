"""engines/torch/kernels/int_linear: weight-only int8 / int4 kernels against a float64 reference on the
dequantized weight, for M = 1..8 and beyond, K tails, N not a multiple of the tile, symmetric and
asymmetric int4 with group sizes 16..128, bf16 and fp32 x, bias; determinism, batch and thread
invariance, GIL release, the torch fallbacks, the int4 packing, dequantization, and the layers' use.

Every test runs once per ISA level this CPU has (int_gemv.cpp for AVX-512, int_gemv_avx2.cpp for AVX2).
Skipped when the kernels are unavailable (neither, or no compiler or ninja). The first run compiles the
extensions (~1 min each), later runs load them from torch's extension cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engines.quant.rtn import dequantize, quantize_rtn
from engines.quant.types import QuantizedWeight
from engines.torch.kernels import extension
from engines.torch.kernels import int_linear as kmod
from engines.torch.kernels.int_linear import (
    SMALL_M_MAX_INT4,
    SMALL_M_MAX_INT8,
    available,
    int4_dequantize,
    int4_linear,
    int8_dequantize,
    int8_linear,
    pack_int4,
    unpack_int4,
)
from engines.torch.layers.quantized import Int4WeightOnlyLinear, Int8WeightOnlyLinear
from tests.gil_helpers import assert_releases_gil
from tests.isa_helpers import dot_path, isa_level_fixture  # noqa: F401 (dot_path: a fixture)

MS = list(range(1, 9)) + [9, 16, 21, 33]  # decode sizes, then the multi-pass path (still exact)
INT8_SHAPES = [(960, 576), (576, 1536), (100, 100), (33, 77), (17, 1), (48, 31), (40, 33), (1000, 63), (5, 200)]
# (N, K, group): K % 64 != 0 tails (96, 160, 80, 1088 % 128), N % 16 != 0
INT4_SHAPES = [
    (960, 576, 64),
    (576, 1536, 128),
    (33, 96, 32),
    (100, 160, 32),
    (17, 80, 16),
    (40, 1088, 64),
    (5, 128, 128),
    (3072, 576, 32),
]


isa_level = isa_level_fixture(kmod._EXT)  # every test below, once per ISA level this CPU has


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if not available():
        pytest.skip("int_linear kernels unavailable (neither AVX-512 F/BW/VL nor AVX2, or no compiler or ninja)")


def _x(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _w(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def _check(
    y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, rounded_dot: bool = False
) -> None:
    """y vs float64 x @ w^T + b, w the dequantized weight.

    Bound: the kernels form every product x*w and sum them in fp32 (16 lanes of K/16 terms each, a
    4-level tree across lanes, then the scale multiply and the bias add), so the error is at most
    ~(K/16 + 8) fp32 roundings of the magnitudes involved: (K/16 + 8) * 2^-24 * (sum_k |x_k w_k| + |b|).
    A bf16 result adds one rounding to bf16: 2^-9 of |y| (2^-8 allowed for the rounding of the error
    itself). fp32 x is used exactly; bf16 x converts to fp32 exactly. `rounded_dot`: a bf16 result whose dot
    product is rounded to bf16 before the scale (int8, as the large-M path computes) adds 2^-8 of |x w^T| more."""
    assert y.dtype == x.dtype and y.shape == (x.shape[0], w.shape[0])
    xd, wd = x.double(), w.double()
    bd = None if b is None else b.double()
    ref = F.linear(xd, wd, bd)
    mag = F.linear(xd.abs(), wd.abs(), None if bd is None else bd.abs())
    k = x.shape[1]
    bound = (k / 16 + 8) * 2.0**-24 * mag + (2.0**-8 * ref.abs() if y.dtype == torch.bfloat16 else 0) + 1e-30
    if rounded_dot and y.dtype == torch.bfloat16:
        bound = bound + 2.0**-8 * F.linear(xd, wd).abs()
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g} (max err {err.max().item():.3g})"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,k", INT8_SHAPES)
def test_int8_matches_reference(n, k, dtype):
    qw = quantize_rtn(_w(n, k, seed=n + k), 8)
    s = qw.scales.reshape(-1).contiguous()
    wdq = dequantize(qw)
    for bias in (False, True):
        b = torch.randn(n, generator=torch.Generator().manual_seed(k)) if bias else None
        for m in MS:
            x = _x(m, k, dtype, seed=m * 100 + k)
            _check(int8_linear(x, qw.qweight, s, b), x, wdq, b, rounded_dot=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("n,k,g", INT4_SHAPES)
def test_int4_matches_reference(n, k, g, symmetric, dtype):
    qw = quantize_rtn(_w(n, k, seed=n + k + g), 4, group_size=g, symmetric=symmetric)
    packed = pack_int4(qw.qweight)
    wdq = dequantize(qw).to(dtype)  # bf16 x: the kernel multiplies by the weights rounded to bf16 (int4_linear)
    for bias in (False, True):
        b = torch.randn(n, generator=torch.Generator().manual_seed(k)).bfloat16() if bias else None
        for m in MS:
            x = _x(m, k, dtype, seed=m * 100 + k)
            _check(int4_linear(x, packed, qw.scales, qw.zeros, g, b), x, wdq, b)


def test_lm_head_shape_and_group_128():
    for k, g in ((576, 64), (1536, 128), (256, 256)):
        qw = quantize_rtn(_w(4099, k, seed=k), 4, group_size=g, symmetric=False)
        p = pack_int4(qw.qweight)
        q8 = quantize_rtn(_w(4099, k, seed=k), 8)
        for m in (1, 3, 8):
            x = _x(m, k, torch.bfloat16, seed=m)
            _check(int4_linear(x, p, qw.scales, qw.zeros, g), x, dequantize(qw).bfloat16(), None)  # bf16 weights
            _check(int8_linear(x, q8.qweight, q8.scales.reshape(-1)), x, dequantize(q8), None, rounded_dot=True)


def test_large_m_direct_call():
    # prefill-sized x (its fp32 copy exceeds the per-thread scratch): slower than dequantize + F.linear
    # there, but still right
    q8 = quantize_rtn(_w(70, 1536, seed=20), 8)
    q4 = quantize_rtn(_w(70, 1536, seed=20), 4, group_size=128, symmetric=False)
    x = _x(100, 1536, torch.bfloat16, seed=21)
    _check(int8_linear(x, q8.qweight, q8.scales.reshape(-1)), x, dequantize(q8), None, rounded_dot=True)
    _check(int4_linear(x, pack_int4(q4.qweight), q4.scales, q4.zeros, 128), x, dequantize(q4).bfloat16(), None)


def test_pack_layout_and_round_trip():
    q = torch.randint(-8, 8, (5, 150), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (5, 192 // 2)  # K padded to a multiple of 64
    assert torch.equal(unpack_int4(p, 150), q)
    # chunk c, word j, nibble r holds column 64 c + 16 r + j as q + 8 (little-endian words)
    words = p[:, :32].to(torch.int32).view(5, 16, 2)
    words = words[..., 0] | (words[..., 1] << 8)
    assert torch.equal((words >> 4) & 0xF, (q[:, 16:32] + 8).to(torch.int32))
    assert not unpack_int4(p, 192)[:, 150:].any()  # padding columns hold q = 0
    with pytest.raises(ValueError):
        pack_int4(torch.full((2, 64), 9, dtype=torch.int8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_equals_rtn(dtype, dot_path):
    for n, k, g in INT4_SHAPES:
        for sym in (True, False):
            qw = quantize_rtn(_w(n, k, seed=k), 4, group_size=g, symmetric=sym)
            ref = dequantize(qw).to(dtype)
            got = int4_dequantize(pack_int4(qw.qweight), qw.scales, qw.zeros, g, k, dtype)
            assert got.dtype == dtype and torch.equal(got, ref)
    for n, k in INT8_SHAPES:
        qw = quantize_rtn(_w(n, k, seed=k), 8)
        got = int8_dequantize(qw.qweight, qw.scales, dtype)
        assert got.dtype == dtype and torch.equal(got, dequantize(qw).to(dtype))


def test_layers_dequantized_weight():
    w = _w(300, 576, seed=1)
    for dtype in (torch.float32, torch.bfloat16):
        q8 = quantize_rtn(w, 8)
        l8 = Int8WeightOnlyLinear.from_quantized(q8)
        assert torch.equal(l8.dequantized_weight(dtype), dequantize(q8).to(dtype))
        buf = torch.empty(300, 576, dtype=dtype)
        assert l8.dequantized_weight(dtype, out=buf) is buf and torch.equal(buf, dequantize(q8).to(dtype))
        for g, sym in ((32, True), (64, False), (192, True)):
            q4 = quantize_rtn(w, 4, group_size=g, symmetric=sym)
            layer = Int4WeightOnlyLinear.from_quantized(q4)
            assert layer.small_m_max == SMALL_M_MAX_INT4  # 192 is a multiple of 64
            assert torch.equal(layer.dequantized_weight(dtype), dequantize(q4).to(dtype))
            assert layer.dequantized_weight(dtype, out=buf) is buf and torch.equal(buf, dequantize(q4).to(dtype))
    with pytest.raises(RuntimeError):
        l8.dequantized_weight(torch.bfloat16, out=torch.empty(300, 575, dtype=torch.bfloat16))


def test_batch_thread_invariance_and_determinism():
    n, k = 1000, 576  # 1000 rows: the split across threads and into tiles differs with M and threads
    q8 = quantize_rtn(_w(n, k, seed=3), 8)
    s8 = q8.scales.reshape(-1)
    q4 = quantize_rtn(_w(n, k, seed=4), 4, group_size=64, symmetric=False)
    p4 = pack_int4(q4.qweight)
    b = torch.randn(n)
    fns = [lambda x: int8_linear(x, q8.qweight, s8, b), lambda x: int4_linear(x, p4, q4.scales, q4.zeros, 64, b)]
    for dtype in (torch.bfloat16, torch.float32):
        x = _x(21, k, dtype, seed=5)
        for fn in fns:
            y = fn(x)
            assert torch.equal(fn(x), y)
            for m in (1, 2, 3, 5, 8):  # every output row is one fixed-order sum: same alone or batched
                for i in range(m):
                    assert torch.equal(fn(x[i : i + m]), y[i : i + m])
            for i in (0, 7, 20):
                assert torch.equal(fn(x[i : i + 1]), y[i : i + 1])
            threads = torch.get_num_threads()
            try:
                torch.set_num_threads(1)
                assert torch.equal(fn(x), y)
                assert torch.equal(fn(x[:1]), y[:1])
            finally:
                torch.set_num_threads(threads)


def test_leading_dims_noncontiguous_and_degenerate():
    q8 = quantize_rtn(_w(96, 64, seed=6), 8)
    s8 = q8.scales.reshape(-1)
    q4 = quantize_rtn(_w(96, 64, seed=6), 4, group_size=32)
    p4 = pack_int4(q4.qweight)
    x = _x(6, 64, torch.bfloat16, seed=7)
    for fn in (lambda x: int8_linear(x, q8.qweight, s8), lambda x: int4_linear(x, p4, q4.scales, None, 32)):
        y = fn(x.view(2, 3, 64))
        assert y.shape == (2, 3, 96) and torch.equal(y.view(6, 96), fn(x))
        wide = _x(4, 128, torch.float32, seed=8)
        assert torch.equal(fn(wide[:, ::2]), fn(wide[:, ::2].contiguous()))
        assert fn(torch.empty(0, 64, dtype=torch.bfloat16)).shape == (0, 96)
    empty_k = int8_linear(torch.empty(3, 0), torch.empty(5, 0, dtype=torch.int8), torch.ones(5))
    assert empty_k.shape == (3, 5) and not empty_k.any()


def test_unsupported_group_size_falls_back():
    qw = quantize_rtn(_w(40, 96, seed=9), 4, group_size=48, symmetric=False)  # 48: not 16, 32 or 64 k
    x = _x(3, 96, torch.float32, seed=10)
    y = int4_linear(x, pack_int4(qw.qweight), qw.scales, qw.zeros, 48)
    _check(y, x, dequantize(qw), None)
    layer = Int4WeightOnlyLinear.from_quantized(qw)
    assert layer.small_m_max == 0 and not layer.use_kernel  # nor torch's (32..256 only): dequantize + F.linear
    torch.testing.assert_close(layer(x), y, rtol=1e-4, atol=1e-4)
    assert torch.equal(layer.dequantized_weight(), dequantize(qw))


def test_layers_use_the_kernels():
    w, b = _w(200, 576, seed=11), torch.randn(200)
    q8, q4 = quantize_rtn(w, 8), quantize_rtn(w, 4, group_size=64, symmetric=False)
    l8, l4 = Int8WeightOnlyLinear.from_quantized(q8, b), Int4WeightOnlyLinear.from_quantized(q4, b)
    assert l8.small_m_max == SMALL_M_MAX_INT8 and l4.small_m_max == SMALL_M_MAX_INT4
    assert l4.weight_bytes == 200 * 576 // 2 + 200 * 9 * 4 + 200 * 9
    for dtype in (torch.bfloat16, torch.float32):
        for m in (1, 4, SMALL_M_MAX_INT8):
            x = _x(m, 576, dtype, seed=m)
            assert torch.equal(l8(x), int8_linear(x, q8.qweight, q8.scales.reshape(-1), b))
            assert torch.equal(l4(x), int4_linear(x, pack_int4(q4.qweight), q4.scales, q4.zeros, 64, b))
        for m in (SMALL_M_MAX_INT8 + 1, 64):  # larger steps: torch's int8 kernel / dequantize + F.linear
            x = _x(m, 576, dtype, seed=m)
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
            for layer, qw in ((l8, q8), (l4, q4)):
                ref = F.linear(x.double(), dequantize(qw).double(), b.double())
                assert (layer(x).double() - ref).abs().max() <= tol * ref.abs().max()


def test_act_order_layer_with_kernel():
    w = _w(64, 256, seed=12)
    g = 64
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(13))
    qp = quantize_rtn(w[:, perm], 4, group_size=g, symmetric=False)
    inv = torch.argsort(perm)
    qw = QuantizedWeight(qp.qweight[:, inv].contiguous(), qp.scales, qp.zeros, 4, g, False, (inv // g).to(torch.int32))
    layer = Int4WeightOnlyLinear.from_quantized(qw)
    assert layer.small_m_max > 0
    x = _x(3, 256, torch.float32, seed=14)
    _check(layer(x), x, dequantize(qw), None)


def test_releases_the_gil():
    q = torch.randint(-127, 128, (49152, 1536), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    s = torch.rand(49152) * 1e-3
    x = _x(SMALL_M_MAX_INT8, 1536, torch.bfloat16, seed=15)
    assert_releases_gil(lambda: int8_linear(x, q, s))


def test_fallback_and_no_raise_when_unavailable(monkeypatch, caplog):
    q8 = quantize_rtn(_w(64, 96, seed=16), 8)
    q4 = quantize_rtn(_w(64, 96, seed=16), 4, group_size=32, symmetric=False)
    p4 = pack_int4(q4.qweight)
    x, b = _x(2, 96, torch.bfloat16, seed=17), torch.randn(64)
    y8, y4 = int8_linear(x, q8.qweight, q8.scales.reshape(-1), b), int4_linear(x, p4, q4.scales, q4.zeros, 32, b)
    monkeypatch.setattr(kmod._EXT, "module", None)
    monkeypatch.setattr(kmod._EXT, "decided_for", None)
    monkeypatch.setattr(extension, "cpu_flags", lambda: {"avx512f"})
    with caplog.at_level("WARNING", logger="kiln.kernels"):
        assert kmod.available() is False
    assert len(caplog.records) == 1 and "avx512bw" in caplog.records[0].getMessage()
    f8, f4 = int8_linear(x, q8.qweight, q8.scales.reshape(-1), b), int4_linear(x, p4, q4.scales, q4.zeros, 32, b)
    _check(f8, x, dequantize(q8), b)
    _check(f4, x, dequantize(q4).bfloat16(), b)  # as the kernel, the weights rounded to bf16 for bf16 x
    # the fallbacks round once to bf16 from an fp32 GEMM: within a bf16 ulp of the kernels (the int8 kernel also
    # rounds its dot product before the scale: within the reference bound above, checked for y8 here)
    _check(y8, x, dequantize(q8), b, rounded_dot=True)
    torch.testing.assert_close(f4, y4, rtol=2**-7, atol=1e-3)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(int4_dequantize(p4, q4.scales, q4.zeros, 32, 96, dtype), dequantize(q4).to(dtype))
        assert torch.equal(int8_dequantize(q8.qweight, q8.scales, dtype), dequantize(q8).to(dtype))
    assert Int8WeightOnlyLinear.from_quantized(q8).small_m_max == 0
    assert Int4WeightOnlyLinear.from_quantized(q4).small_m_max == 0  # torch's int4 kernel instead

    def broken_load(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions\nmore detail")

    monkeypatch.setattr(kmod._EXT, "decided_for", None)
    for level in kmod._EXT.variants.values():  # each level's build, as on a fresh start (restored after the test)
        monkeypatch.setattr(level, "tried", False)
        monkeypatch.setattr(level, "module", None)
    monkeypatch.setattr(extension, "cpu_flags", lambda: {"avx512f", "avx512bw", "avx512vl", "avx2", "fma", "f16c"})
    monkeypatch.setattr("torch.utils.cpp_extension.load", broken_load)
    assert kmod.available() is False
    _check(int8_linear(x, q8.qweight, q8.scales.reshape(-1), b), x, dequantize(q8), b)


@pytest.mark.parametrize("bf16_dot", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("g", [16, 32, 64, 128])
def test_int4_decode_multiplies_by_the_dequantized_weights(g, symmetric, dtype, bf16_dot, monkeypatch):
    """A row of x with one nonzero c reads one column of the kernel's weights back (one product, no sum): for bf16 x
    they are int4_dequantize's bf16 values, the ones a prefill-sized step multiplies by, so prefix caching and
    chunked prefill do not change the weights a token sees (with and without the AVX512-BF16 dot products). c is
    not a power of two, so the exact fp32 weights would round differently."""
    flags = extension.cpu_flags()
    if bf16_dot and kmod.BF16_DOT_FLAG not in flags:
        pytest.skip("this CPU has no AVX512-BF16")
    if not bf16_dot:
        monkeypatch.setattr(extension, "cpu_flags", lambda: flags - {kmod.BF16_DOT_FLAG})
    n, k = 40, 384
    qw = quantize_rtn(_w(n, k, seed=g), 4, group_size=g, symmetric=symmetric)
    packed = pack_int4(qw.qweight)
    w = int4_dequantize(packed, qw.scales, qw.zeros, g, k, dtype).float()
    exact = int4_dequantize(packed, qw.scales, qw.zeros, g, k, torch.float32)
    c = 1 + 2**-7  # exact in bf16
    for col in (0, 33, 200, k - 1):
        x = torch.zeros(1, k, dtype=dtype)
        x[0, col] = c
        assert torch.equal(int4_linear(x, packed, qw.scales, qw.zeros, g)[0], (c * w[:, col]).to(dtype)), col
    if dtype == torch.bfloat16:  # the check tells the rounded weights from the exact ones
        assert not torch.equal((c * w).to(dtype), (c * exact).to(dtype))
