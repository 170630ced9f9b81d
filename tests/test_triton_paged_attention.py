"""The Triton paged decode attention kernel against attention._decode_reference, on CPU under Triton's
interpreter (TRITON_INTERPRET=1, set before triton is imported; the kernel is jit-decorated on its first
call, so it is interpreted here whatever else imported triton's package).

The interpreter runs the kernel's math in numpy: masks, block-table walk, online softmax, GQA head
mapping, scales and the fp8 bit trick are checked; tl.dot's input_precision and GPU code generation are not.
fp32: both sides compute in fp32 and differ in summation order only (online vs one-pass softmax).
bf16: both compute in fp32 and torch rounds once to bf16, so they differ by at most one bf16 ulp, and
the kernel is within half an ulp of the fp32 result.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from engines.quant.fp8 import FP8_DTYPE  # noqa: E402
from engines.torch.attention import AttentionMetadata, KVLayer, _decode_reference  # noqa: E402
from engines.torch.kernels import triton_paged_attention  # noqa: E402

BS, HEAD_DIM, NUM_BLOCKS = 16, 64, 24
LENS = [1, 9, 16, 17, 40]  # one token, a partial block, a full one, one past it, several blocks
SCALE = HEAD_DIM**-0.5


def _case(kind, dtype, heads, kv_heads, lens, seed=0):
    """q, the cache (a tensor or a KVLayer) and metadata over shuffled blocks, tables padded by 2 zeros."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(len(lens), heads, HEAD_DIM, generator=gen).to(dtype)
    shape = (2, kv_heads, NUM_BLOCKS, BS, HEAD_DIM)
    if kind == "model":
        cache = torch.randn(shape, generator=gen).to(dtype)
    else:
        # KV heads of different magnitudes: a scale applied to the wrong head or side shows
        k_scale = torch.tensor([0.02, 0.11, 0.05][:kv_heads])
        v_scale = torch.tensor([0.3, 0.007, 0.09][:kv_heads])
        if kind == "int8":
            data = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
        else:  # e4m3 codes over the whole range, subnormals and zeros included
            x = torch.randn(shape, generator=gen) * 40
            x[..., :4] *= 1e-4
            data = x.clamp(-448, 448).to(FP8_DTYPE)
        cache = KVLayer(data, k_scale, v_scale, kind)
    need = [-(-n // BS) for n in lens]
    ids = torch.randperm(NUM_BLOCKS, generator=gen)[: sum(need)].tolist()
    width = max(need) + 2
    rows, at = [], 0
    for m in need:
        rows.append(ids[at : at + m] + [0] * (width - m))
        at += m
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.int64),
        num_decode_tokens=len(lens),
        decode_block_tables=torch.tensor(rows),
        decode_context_lens=torch.tensor(lens),
        decode_max_context=max(lens),
        prefills=[],
    )
    return q, cache, meta


def _kernel(q, cache, meta, window=None):
    if isinstance(cache, KVLayer):
        return triton_paged_attention.decode_attention(
            q,
            cache.codes,
            meta.decode_block_tables,
            meta.decode_context_lens,
            SCALE,
            cache.k_scale,
            cache.v_scale,
            cache.kind,
            window,
        )
    return triton_paged_attention.decode_attention(
        q, cache, meta.decode_block_tables, meta.decode_context_lens, SCALE, window=window
    )


def _check(q, cache, meta, window=None):
    out = _kernel(q, cache, meta, window)
    ref = _decode_reference(q, cache, meta, SCALE, window=window)
    assert out.dtype == q.dtype and out.shape == q.shape
    wide = cache if isinstance(cache, KVLayer) else cache.float()
    ref32 = _decode_reference(q.float(), wide, meta, SCALE, window=window)
    mag = ref32.abs()
    noise = 1e-6 * mag.amax()  # fp32 summation order, relative to the largest output (values reach ~40 here)
    if q.dtype == torch.float32:
        assert ((out - ref).abs() <= mag * 1e-5 + noise).all(), (out - ref).abs().max()
    else:
        assert ((out.float() - ref32).abs() <= mag * 2**-8 + noise).all()
        assert ((out.float() - ref.float()).abs() <= mag * 2**-7 + noise).all()


@pytest.mark.parametrize("kind", ["model", "int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (9, 3)], ids=["mha", "gqa3"])
@pytest.mark.parametrize("lens", [LENS, [40], [1]], ids=["b5", "b1-40", "b1-1"])
def test_matches_reference(kind, dtype, heads, kv_heads, lens):
    _check(*_case(kind, dtype, heads, kv_heads, lens))


# one key; 8: windows starting mid-block (rows 9, 16, 17) and on a block edge (row 40: at 32); 24: row 40's starts
# at 16, off the tile grid of BLOCK_N; 64: wider than every context
@pytest.mark.parametrize("window", [1, 8, 24, 64])
@pytest.mark.parametrize("kind", ["model", "int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_window_matches_reference(window, kind, dtype):
    _check(*_case(kind, dtype, 9, 3, LENS, seed=3), window=window)


def test_window_skips_the_keys_before_it():
    q, cache, meta = _case("model", torch.float32, 9, 3, [40], seed=4)
    before = _kernel(q, cache, meta, window=20)  # positions 20 .. 39
    table = meta.decode_block_tables[0]
    cache[:, :, table[0]] = 1e4  # positions 0 .. 15
    cache[:, :, table[1], :4] = 1e4  # 16 .. 19
    assert torch.equal(_kernel(q, cache, meta, window=20), before)
    cache[1, :, table[1], 4] = 1e4  # position 20
    assert not torch.allclose(_kernel(q, cache, meta, window=20), before)


def test_group_of_four_with_two_kv_heads():
    _check(*_case("model", torch.float32, 8, 2, [33, 5, 64], seed=1))


def test_masks_what_lies_past_the_context():
    """Changing a cache slot past a row's context (same block, and a padded table entry) changes nothing;
    changing one inside it does."""
    q, cache, meta = _case("model", torch.float32, 9, 3, [9], seed=2)
    before = _kernel(q, cache, meta)
    block = int(meta.decode_block_tables[0, 0])
    assert block != 0
    cache[:, :, block, 9:] = 1e4  # past position 8
    cache[:, :, 0] = 1e4  # block 0: what the padded table entries name
    assert torch.equal(_kernel(q, cache, meta), before)
    cache[1, :, block, 8] = 1e4
    assert not torch.allclose(_kernel(q, cache, meta), before)


def test_triton_is_cuda_only():
    q, cache, _ = _case("model", torch.float32, 2, 2, [1])
    assert triton_paged_attention.takes(q.dtype, q.shape[-1])
    assert not triton_paged_attention.available("cpu")  # CPU keeps the C++ kernel or the torch path
