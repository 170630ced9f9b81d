"""Kernels are chosen once per engine, at load: steps never ask a kernel whether it is available or applies,
and the torch reference attention, forced, decodes the same tokens as the selected kernels."""

from __future__ import annotations

import functools

import pytest
import torch

from engines.base import GenerationRequest
from engines.torch import attention_backend, model_runner
from engines.torch.attention_backend import (
    CPP_ATTENTION,
    CPP_FUSED_ATTENTION,
    TORCH_ATTENTION,
    TRITON_ATTENTION,
    select_attention_backend,
)
from engines.torch.kernels import amx_linear, bf16_linear, int_linear, paged_attention, rope_kv, triton_paged_attention
from tests.conftest import greedy, run_to_completion

CPU = torch.device("cpu")


def _requests() -> list[GenerationRequest]:
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (5, 23, 40)]
    return [GenerationRequest(str(i), p, greedy(12, ignore_eos=True)) for i, p in enumerate(prompts)]


def test_selection(monkeypatch):
    assert select_attention_backend(CPU, torch.float32, 64, reference=True) is TORCH_ATTENTION
    assert select_attention_backend(CPU, torch.float16, 64) is TORCH_ATTENTION  # no kernel takes fp16 on CPU
    expected = (
        TORCH_ATTENTION
        if not paged_attention.available()
        else CPP_FUSED_ATTENTION
        if rope_kv.available()
        else CPP_ATTENTION
    )
    assert select_attention_backend(CPU, torch.bfloat16, 64) is expected
    cuda = torch.device("cuda")
    monkeypatch.setattr(triton_paged_attention, "available", lambda device: True)
    assert select_attention_backend(cuda, torch.bfloat16, 128) is TRITON_ATTENTION
    assert select_attention_backend(cuda, torch.bfloat16, 512) is TORCH_ATTENTION  # past one tile of registers
    monkeypatch.setattr(triton_paged_attention, "available", lambda device: False)
    assert select_attention_backend(cuda, torch.bfloat16, 128) is TORCH_ATTENTION


def test_kernels_are_chosen_at_load_only(tiny_models, make_engine, monkeypatch):
    """Build an engine, then serve: neither the selection nor any kernel's availability or shape check runs
    again during the steps."""
    calls: dict[str, int] = {}

    def count(module, name):
        original = getattr(module, name)

        def counted(*args, **kwargs):
            calls[f"{module.__name__}.{name}"] = calls.get(f"{module.__name__}.{name}", 0) + 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    for module in (paged_attention, rope_kv, triton_paged_attention, amx_linear, bf16_linear, int_linear):
        count(module, "available")
    count(triton_paged_attention, "takes")
    count(model_runner, "select_attention_backend")
    core = make_engine(tiny_models("llama-gqa")[0])
    assert calls.pop("engines.torch.model_runner.select_attention_backend") == 1
    assert calls.get("engines.torch.kernels.paged_attention.available")  # the CPU candidate was asked, once
    calls.clear()
    run_to_completion(core, _requests(), arrivals={"2": 3})  # prefills beside decodes
    assert calls == {}


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-mha"])
def test_forced_reference_decodes_the_same_tokens(name, tiny_models, make_engine, monkeypatch):
    loaded = tiny_models(name)[0]
    selected = make_engine(loaded)
    monkeypatch.setattr(
        model_runner,
        "select_attention_backend",
        functools.partial(attention_backend.select_attention_backend, reference=True),
    )
    reference = make_engine(loaded)
    assert reference.runner.attention is TORCH_ATTENTION
    assert run_to_completion(reference, _requests(), arrivals={"2": 3}) == run_to_completion(
        selected, _requests(), arrivals={"2": 3}
    )
