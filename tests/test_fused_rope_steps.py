"""Steps through the rope_kv kernel (RoPE and the cache write in one op, prefill chunks included) decode
exactly as the torch path: same logits bit for bit, bf16 and fp32, model-dtype, int8 and fp8 caches, with
prefills mixed into decode steps, chunked prompts and prefix-cache hits."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engines.base import GenerationRequest
from engines.torch import model_runner
from engines.torch.attention_backend import CPP_ATTENTION
from engines.torch.kernels import paged_attention, rope_kv
from engines.torch.loader import load_checkpoint
from tests.conftest import greedy, run_to_completion

pytestmark = pytest.mark.skipif(
    not (rope_kv.available() and paged_attention.available()),
    reason="the rope_kv / paged-attention kernels are unavailable",
)


def _run(loaded, make_engine, cache: str):
    scales = (
        torch.rand(
            loaded.model.args.num_layers, 2, loaded.model.args.num_kv_heads, generator=torch.Generator().manual_seed(1)
        )
        * 0.05
        + 0.02
    )
    core = make_engine(
        loaded, kv_cache_dtype=cache, kv_cache_scales=scales if cache == "int8" else None, max_num_batched_tokens=40
    )  # chunked prompts, prefills beside decodes
    logits = []
    execute = core.runner.execute

    def spy(chunks):
        out = execute(chunks)
        logits.append(out[0].clone())
        return out

    core.runner.execute = spy
    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(3, 500, (32,), generator=gen).tolist()  # two full blocks: a prefix-cache hit
    prompts = [shared + torch.randint(3, 500, (n,), generator=gen).tolist() for n in (5, 30, 17)]
    prompts.append(torch.randint(3, 500, (50,), generator=gen).tolist())
    requests = [GenerationRequest(str(i), p, greedy(12, ignore_eos=True)) for i, p in enumerate(prompts)]
    tokens = run_to_completion(core, requests, arrivals={"0": 0, "1": 0, "2": 3, "3": 5})
    return tokens, logits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cache", ["model", "int8", "fp8"])
@pytest.mark.parametrize("name", ["llama-gqa", "qwen3-gqa", "olmo2-gqa"])  # Qwen3, OLMo 2: q/k norms before RoPE
def test_fused_steps_equal_the_torch_path(tiny_models, make_engine, monkeypatch, name, dtype, cache):
    base = tiny_models(name)[0]  # float32; a bf16 copy is loaded from its folder
    loaded = (
        base
        if dtype == base.dtype
        else dataclasses.replace(
            base, model=load_checkpoint(base.folder, base.hf_config, dtype, base.device), dtype=dtype
        )
    )
    fused_tokens, fused_logits = _run(loaded, make_engine, cache)
    monkeypatch.setattr(model_runner, "select_attention_backend", lambda *args, **kw: CPP_ATTENTION)  # unfused
    torch_tokens, torch_logits = _run(loaded, make_engine, cache)
    assert fused_tokens == torch_tokens
    assert len(fused_logits) == len(torch_logits) > 10
    for a, b in zip(fused_logits, torch_logits):
        assert torch.equal(a, b)
