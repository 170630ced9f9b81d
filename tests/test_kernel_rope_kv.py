"""The C++ RoPE + KV-cache write (rope_kv.cpp) against the torch path it replaces, bit for bit: the rotated
queries and keys, and every byte of the cache for model-dtype (bf16, fp32), int8 and fp8 caches, for a
decode-sized step and a prefill-sized one (spread over threads)."""

from __future__ import annotations

import pytest
import torch

from engines.torch.attention import KVLayer, write_kv
from engines.torch.kernels import rope_kv
from engines.torch.models.llama import LlamaArgs, LlamaForCausalLM, _rotate
from tests.isa_helpers import isa_level_fixture

isa_level = isa_level_fixture(rope_kv._EXT)  # every test below, once per ISA level this CPU has

H, KVH, D, NB, BS = 9, 3, 64, 48, 16


def rope_tables(dtype):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        hidden_size=H * D,
        num_attention_heads=H,
        num_key_value_heads=KVH,
        num_hidden_layers=1,
        intermediate_size=64,
        vocab_size=32,
        rope_theta=10000.0,
    )
    model = LlamaForCausalLM(LlamaArgs.from_hf_config(cfg))
    model.init_rope(512, dtype, "cpu")
    return model.cos, model.sin


def torch_path(qkv, cos, sin, positions, slots, cache):
    t = qkv.shape[0]
    qk = _rotate(qkv[:, : (H + KVH) * D].view(t, H + KVH, D), cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))
    q, k = qk[:, :H], qk[:, H:]
    v = qkv[:, (H + KVH) * D :].view(t, KVH, D)
    if isinstance(cache, KVLayer):
        cache.write(k, v, slots)
    else:
        write_kv(cache, k, v, slots)
    return q, k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["model", "int8", "fp8"])
@pytest.mark.parametrize("t", [7, 600])
def test_rope_store_equals_the_torch_path_bit_for_bit(dtype, kind, t):
    gen = torch.Generator().manual_seed(0)
    cos, sin = rope_tables(dtype)
    qkv = (torch.randn(t, (H + 2 * KVH) * D, generator=gen) * 3).to(dtype)
    qkv[0, :5] = torch.tensor([1e4, -1e4, 0.5, -0.5, 0.0])  # clamped codes, ties, zero
    positions = (
        torch.tensor([0, 1, 17, 100, 255, 300, 511])[:t] if t <= 7 else torch.randint(0, 512, (t,), generator=gen)
    )
    slots = torch.randperm(NB * BS, generator=gen)[:t]
    scales = torch.rand(2, KVH, generator=gen) * 0.05 + 0.01

    def make_cache():
        if kind == "model":
            return torch.zeros(2, KVH, NB, BS, D, dtype=dtype)
        storage = torch.zeros(2, KVH, NB, BS, D, dtype=torch.int8 if kind == "int8" else torch.float8_e4m3fn)
        return KVLayer(storage, scales[0], scales[1], kind)

    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    ref_cache, fused_cache = make_cache(), make_cache()
    q_ref, k_ref = torch_path(qkv, cos, sin, positions, slots, ref_cache)
    quant = isinstance(fused_cache, KVLayer)
    q, k = rope_kv.rope_store(
        qkv,
        cos,
        sin,
        positions,
        slots,
        fused_cache.codes if quant else fused_cache,
        fused_cache.scales if quant else None,
        kind,
        H,
        KVH,
        return_keys=True,
    )
    assert torch.equal(q.view(bits), q_ref.contiguous().view(bits))
    assert torch.equal(k.view(bits), k_ref.contiguous().view(bits))
    ref_bytes = ref_cache.codes if quant else ref_cache.view(torch.int8)
    got_bytes = fused_cache.codes if quant else fused_cache.view(torch.int8)
    assert torch.equal(got_bytes, ref_bytes)
    assert got_bytes.any()


def test_bad_inputs_are_refused_not_written():
    cos, sin = rope_tables(torch.float32)
    cache = torch.zeros(2, KVH, NB, BS, D)
    qkv = torch.randn(1, (H + 2 * KVH) * D)
    with pytest.raises(RuntimeError, match="slot out of range"):
        rope_kv.rope_store(qkv, cos, sin, torch.tensor([0]), torch.tensor([NB * BS]), cache, None, "model", H, KVH)
    with pytest.raises(RuntimeError, match="position beyond the RoPE table"):
        rope_kv.rope_store(qkv, cos, sin, torch.tensor([512]), torch.tensor([0]), cache, None, "model", H, KVH)
    assert not cache.any()
