"""The C++ paged decode attention kernel against attention._decode_reference (the torch path), at every ISA level
this machine has (AVX-512 and AVX2 builds of one source; on AVX512-BF16 CPUs the AVX-512 build's bf16 path too).

fp32: both sides compute in fp32 and differ only in summation order (MKL's bmm vs the kernel's
16- or 8-lane dot products, softmax normaliser), a few ulps of O(1) values, far below 1e-5 absolute.
bf16: both compute in fp32 and round once to bf16, so they may differ by one bf16 ulp where the fp32
results straddle a rounding boundary; the kernel must also be within half an ulp of the fp32 result.
A sliding window (the query sees its last `window` keys) on every path: the generic one (head_dim 40), the fast one
(64, 128) and the AVX512-BF16 one, with windows starting inside a block, on a block edge, and past the context.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engines.quant.fp8 import FP8_DTYPE
from engines.torch.attention import AttentionMetadata, KVLayer, _decode, _decode_reference
from engines.torch.attention_backend import CPP_FUSED_ATTENTION, select_attention_backend
from engines.torch.kernels import extension, paged_attention, rope_kv
from tests.isa_helpers import isa_level_fixture, levels_here

pytestmark = pytest.mark.skipif(not paged_attention.available(), reason="paged_attention kernel unavailable")
isa_level = isa_level_fixture(paged_attention._EXT)  # every test below, once per ISA level this CPU has

BS = 16
LENS = [1, 15, 16, 17, 300]


def _tables(lens, num_blocks, pad, gen):
    """Block tables over shuffled (non-contiguous) block ids, rows padded with `pad` zeros."""
    need = [(n + BS - 1) // BS for n in lens]
    ids = torch.randperm(num_blocks, generator=gen)[: sum(need)]
    width = max(need) + pad
    rows, at = [], 0
    for n in need:
        rows.append(ids[at : at + n].tolist() + [0] * (width - n))
        at += n
    return torch.tensor(rows, dtype=torch.int64)


def _meta(tables, lens):
    lens_t = torch.tensor(lens, dtype=torch.int64)
    return AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.int64),
        num_decode_tokens=len(lens),
        decode_block_tables=tables,
        decode_context_lens=lens_t,
        decode_max_context=max(lens),
        prefills=[],
    )


def _case(kind, dtype, heads, kv_heads, head_dim, lens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = 64
    q = torch.randn(len(lens), heads, head_dim, generator=gen).to(dtype)
    shape = (2, kv_heads, num_blocks, BS, head_dim)
    if kind == "model":
        cache = torch.randn(shape, generator=gen).to(dtype)
    else:
        k_scale = torch.rand(kv_heads, generator=gen) * 0.05 + 0.01
        v_scale = torch.rand(kv_heads, generator=gen) * 0.05 + 0.01
        if kind == "int8":
            data = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
        else:  # realistic e4m3 codes, subnormals and zeros included
            x = torch.randn(shape, generator=gen) * 3
            x[..., :4] *= 1e-3
            data = x.to(FP8_DTYPE)
        cache = KVLayer(data, k_scale, v_scale, kind)
    tables = _tables(lens, num_blocks, pad=2, gen=gen)
    return q, cache, _meta(tables, lens)


def _kernel(q, cache, meta, scale, window=None):
    if isinstance(cache, KVLayer):
        return paged_attention.decode_attention(
            q,
            cache.codes,
            meta.decode_block_tables,
            meta.decode_context_lens,
            scale,
            cache.k_scale,
            cache.v_scale,
            cache.kind,
            window,
        )
    return paged_attention.decode_attention(
        q, cache, meta.decode_block_tables, meta.decode_context_lens, scale, window=window
    )


def _check(out, q, cache, meta, scale, window=None):
    ref = _decode_reference(q, cache, meta, scale, window=window)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out.float()).all()
    if q.dtype == torch.float32:
        err = (out - ref).abs().max().item()
        assert err <= 1e-5, err
    else:
        wide = cache if isinstance(cache, KVLayer) else cache.float()
        ref32 = _decode_reference(q.float(), wide, meta, scale, window=window)
        mag = ref32.abs()
        # within half a bf16 ulp (2**-8 relative) of the fp32 result, and one ulp of the bf16 reference
        assert ((out.float() - ref32).abs() <= mag * 2**-8 + 1e-5).all()
        assert ((out.float() - ref.float()).abs() <= mag * 2**-7 + 1e-5).all()
    return ref


@pytest.mark.parametrize("kind", ["model", "int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3), (8, 2)])
@pytest.mark.parametrize("lens", [[300], [1], LENS], ids=["b1-300", "b1-1", "b5"])
def test_matches_reference(kind, dtype, heads, kv_heads, lens):
    head_dim = 64
    q, cache, meta = _case(kind, dtype, heads, kv_heads, head_dim, lens)
    scale = head_dim**-0.5
    _check(_kernel(q, cache, meta, scale), q, cache, meta, scale)


# the AVX512-BF16 path runs only where the CPU has the instruction (elsewhere it would fault)
BF16_DOT = [False, *([True] if paged_attention.BF16_DOT_FLAG in extension.cpu_flags() else [])]


@pytest.mark.parametrize("bf16_dot", BF16_DOT, ids=lambda on: "bf16-dot" if on else "no-bf16-dot")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (12, 4), (10, 2), (12, 2)])
def test_bf16_cache_head_groups(head_dim, heads, kv_heads, bf16_dot):
    """bf16 over a bf16 cache has its own path in the AVX-512 build (AVX512-BF16 scores, value passes over up to
    16 / (D / 16) query heads at a time) and the common fast path without it; these group sizes split into every
    pass width, for both head sizes."""
    q, cache, meta = _case("model", torch.bfloat16, heads, kv_heads, head_dim, LENS, seed=4)
    scale = head_dim**-0.5
    raw = paged_attention._EXT.get().decode_attention  # the flag as given, not as this CPU's flags decide
    out = raw(q, cache, meta.decode_block_tables, meta.decode_context_lens, scale, None, None, "model", bf16_dot, 0)
    _check(out, q, cache, meta, scale)


# one key; 17: row 300's window starts mid-block (at 283); 284: on a block edge (at 16); 400: wider than every
# context (the whole context, as without a window)
WINDOWS = [1, 17, 284, 400]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("kind", ["model", "int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [40, 64, 128], ids=lambda d: f"d{d}")
def test_window_matches_reference(window, kind, dtype, head_dim):
    q, cache, meta = _case(kind, dtype, 8, 2, head_dim, LENS, seed=7)
    scale = head_dim**-0.5
    _check(_kernel(q, cache, meta, scale, window), q, cache, meta, scale, window)


@pytest.mark.parametrize("bf16_dot", BF16_DOT, ids=lambda on: "bf16-dot" if on else "no-bf16-dot")
@pytest.mark.parametrize("window", WINDOWS)
def test_window_on_the_bf16_cache_paths(window, bf16_dot):
    q, cache, meta = _case("model", torch.bfloat16, 12, 4, 64, LENS, seed=8)
    raw = paged_attention._EXT.get().decode_attention
    lens = meta.decode_context_lens
    out = raw(q, cache, meta.decode_block_tables, lens, 0.125, None, None, "model", bf16_dot, window)
    _check(out, q, cache, meta, 0.125, window)


@pytest.mark.parametrize("head_dim", [40, 64])
def test_window_skips_the_keys_before_it(head_dim):
    """Keys and values before the window change nothing (they are skipped, not read and masked); the first one
    inside it does."""
    q, cache, meta = _case("model", torch.float32, 4, 2, head_dim, [40], seed=9)
    before = _kernel(q, cache, meta, 0.1, window=20)  # positions 20 .. 39
    table = meta.decode_block_tables[0]
    cache[:, :, table[0]] = 1e4  # positions 0 .. 15
    cache[:, :, table[1], :4] = 1e4  # 16 .. 19
    assert torch.equal(_kernel(q, cache, meta, 0.1, window=20), before)
    cache[1, :, table[1], 4] = 1e4  # position 20
    assert not torch.allclose(_kernel(q, cache, meta, 0.1, window=20), before)


@pytest.mark.parametrize("kind", ["model", "fp8"])
def test_head_dim_not_multiple_of_16(kind):
    q, cache, meta = _case(kind, torch.float32, 6, 2, 40, LENS, seed=1)
    _check(_kernel(q, cache, meta, 40**-0.5), q, cache, meta, 40**-0.5)


def test_decode_dispatches_to_kernel():
    for kind in ("model", "int8"):
        q, cache, meta = _case(kind, torch.bfloat16, 9, 3, 64, LENS, seed=2)
        selected = dataclasses.replace(meta, backend=select_attention_backend(torch.device("cpu"), torch.bfloat16, 64))
        assert torch.equal(_decode(q, cache, selected, 0.125), _kernel(q, cache, meta, 0.125))


@pytest.mark.parametrize("kind", ["model", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariance(kind, dtype):
    q, cache, meta = _case(kind, dtype, 9, 3, 64, LENS, seed=3)
    batched = _kernel(q, cache, meta, 0.125)
    for i, n in enumerate(LENS):
        width = (n + BS - 1) // BS
        alone = _kernel(q[i : i + 1], cache, _meta(meta.decode_block_tables[i : i + 1, :width], [n]), 0.125)
        assert torch.equal(alone[0], batched[i]), (kind, dtype, n)


def test_fp8_table_matches_torch():
    codes = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8).view(torch.int8)
    expect = codes.view(FP8_DTYPE).float()
    # one KV head, one token per code: q = one-hot picks element d, value = code * 1.0
    d = codes.numel()
    cache = torch.zeros(2, 1, 1, 1, d, dtype=torch.int8)
    cache[1, 0, 0, 0] = codes
    one = torch.ones(1)
    q = torch.zeros(1, 1, d)
    out = paged_attention.decode_attention(
        q, cache, torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, dtype=torch.int64), 1.0, one, one, "fp8"
    )
    assert torch.equal(out[0, 0], expect)


def test_levels_agree_within_tolerance_of_each_other():
    """The builds sum in different orders (16 vs 8 lanes) but both stay within the reference's tolerance, so they
    differ from each other by at most twice it; the AVX2 build is not silently the same module."""
    levels = levels_here()
    assert len(levels) >= 2, f"this machine runs only {levels}: nothing to compare"
    modules = [paged_attention._EXT.variants[level].get() for level in levels]
    assert len({id(m) for m in modules}) == len(modules)
    q, cache, meta = _case("int8", torch.float32, 8, 2, 128, LENS, seed=5)
    args = (q, cache.codes, meta.decode_block_tables, meta.decode_context_lens, 0.1, cache.k_scale, cache.v_scale)
    outs = [m.decode_attention(*args, "int8", False, 0) for m in modules]
    assert all((o - outs[0]).abs().max().item() <= 2e-5 for o in outs[1:])


def test_kiln_cpu_isa_avx2_selects_the_cpp_backends(monkeypatch, kernels_decide_again):
    """On an AVX2-class CPU the C++ decode attention and the fused RoPE/KV write run (their AVX2 builds), not the
    torch path."""
    assert "avx512" in levels_here(), "this machine cannot show KILN_CPU_ISA moving the kernels down a level"
    monkeypatch.setenv("KILN_CPU_ISA", "avx2")
    extension.reset()
    for dtype in (torch.float32, torch.bfloat16):
        assert select_attention_backend(torch.device("cpu"), dtype, 64) is CPP_FUSED_ATTENTION
    assert paged_attention._EXT.level == "avx2" and rope_kv._EXT.level == "avx2"


def test_kiln_cpu_isa_below_avx512bf16_turns_the_bf16_dot_products_off(monkeypatch, kernels_decide_again):
    """The AVX512-BF16 path follows extension.cpu_flags(), not the CPU alone: KILN_CPU_ISA=avx512 runs the AVX-512
    build without it."""
    assert "avx512" in levels_here(), "this machine cannot run the AVX-512 build"
    monkeypatch.setenv("KILN_CPU_ISA", "avx512")
    extension.reset()
    q, cache, meta = _case("model", torch.bfloat16, 9, 3, 64, [300], seed=6)
    ext = paged_attention._EXT.get()
    assert paged_attention._EXT.level == "avx512"
    without = ext.decode_attention(
        q, cache, meta.decode_block_tables, meta.decode_context_lens, 0.125, None, None, "model", False, 0
    )
    assert torch.equal(_kernel(q, cache, meta, 0.125), without)
