"""Qwen3 (q/k norms per head before RoPE, its own head_dim) and OLMo 2 (q/k norms over the whole projections,
norms after each sublayer) in the torch engine: greedy float32 output equals transformers' token for token,
alone and in a concurrent batch with a prefix-cache hit and chunked prompts, on the fused (rope_kv) and unfused
attention paths, and under speculative decoding; their norms round as transformers' do; the quantization
topology's folds are exact."""

from __future__ import annotations

import pytest
import torch

from engines.build.quantize import LayerWeights
from engines.torch import model_runner
from engines.torch.attention_backend import CPP_ATTENTION
from engines.torch.models import olmo2, qwen3
from engines.torch.models.registry import ARCHITECTURES, architecture
from tests.arch_parity import (
    changed_kinds,
    check_greedy_alone_and_batched,
    check_speculative_output,
    float_logits,
    folded,
    speculative_engine,
)

MODELS = ["qwen3-gqa", "qwen3-mha-bias", "olmo2-gqa", "olmo2-mha"]


@pytest.mark.parametrize("fused", [True, False], ids=["fused-rope", "torch-rope"])
@pytest.mark.parametrize("name", MODELS)
def test_greedy_equals_transformers_alone_and_batched(name, fused, tiny_models, reference, make_engine, monkeypatch):
    if not fused:
        monkeypatch.setattr(model_runner, "select_attention_backend", lambda *args, **kw: CPP_ATTENTION)
    check_greedy_alone_and_batched(make_engine, tiny_models(name)[0], reference(name), unfused=not fused)


OTHER_DRAFT = {"qwen3-gqa": "qwen3-mha-bias", "olmo2-gqa": "olmo2-mha"}


# the target drafting for itself (every draft accepted), the family's other tiny model (drafts rejected and rolled
# back), n-gram lookup
@pytest.mark.parametrize("setup", ["draft-same", "draft-other", "ngram"])
@pytest.mark.parametrize("name", ["qwen3-gqa", "olmo2-gqa"])
def test_speculative_decoding_keeps_the_greedy_output(name, setup, tiny_models, reference, make_engine):
    other = tiny_models(OTHER_DRAFT[name])[0] if setup == "draft-other" else None
    core = speculative_engine(make_engine, tiny_models(name)[0], setup, other)
    check_speculative_output(core, reference(name))
    stats = core.stats()
    if setup == "draft-same":
        assert stats.spec_accepted_tokens == stats.spec_draft_tokens
    else:
        assert stats.spec_accepted_tokens < stats.spec_draft_tokens


def test_fused_path_is_what_the_engine_runs_here(tiny_models, make_engine):
    """The parity test above covers the rope_kv path only where it is the engine's choice."""
    from engines.torch.kernels import paged_attention, rope_kv

    if not (rope_kv.available() and paged_attention.available()):
        pytest.skip("the rope_kv / paged-attention kernels are unavailable")
    assert make_engine(tiny_models("qwen3-gqa")[0]).runner.attention.fused_rope


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_qwen3_head_norm_rounds_like_transformers(dtype):
    """kiln's rms_norm on the [T * heads, head_dim] rows against Qwen3RMSNorm: bit for bit in bf16 (the rounding
    the kernel shares with LlamaRMSNorm), within a few ulps in float32 (its one-pass mean of squares and 1 / sqrt,
    as for every Llama norm kiln runs)."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    from engines.torch.kernels.rms_norm import rms_norm

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 4, 32, generator=gen) * 3).to(dtype)
    ref = Qwen3RMSNorm(32, eps=1e-6).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(32, generator=gen) * 0.5 + 1)
        expected = ref(x)
    got = rms_norm(x, ref.weight.detach(), 1e-6)
    if dtype == torch.bfloat16:
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=4e-7, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_olmo2_norm_rounds_like_transformers(dtype):
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 96, generator=gen) * 3).to(dtype)
    ref = Olmo2RMSNorm(96, eps=1e-6).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(96, generator=gen) * 0.5 + 1)
        expected = ref(x)
    got = olmo2.olmo2_rms_norm(x, ref.weight.detach(), 1e-6)
    if dtype == torch.bfloat16:
        assert torch.equal(got, expected)  # the weight multiplies in float32, one rounding
    else:
        torch.testing.assert_close(got, expected, rtol=4e-7, atol=0)


def test_registry_serves_both_with_their_own_classes():
    assert ARCHITECTURES["qwen3"].model_class is qwen3.Qwen3ForCausalLM
    assert ARCHITECTURES["olmo2"].model_class is olmo2.Olmo2ForCausalLM
    with pytest.raises(ValueError) as info:
        architecture("gemma9")
    assert "'gemma9'" in str(info.value) and "qwen3" in str(info.value) and "olmo2" in str(info.value)


def test_qwen3_sliding_window_only_with_use_sliding_window():
    from transformers import Qwen3Config

    args = ARCHITECTURES["qwen3"].args_from_config
    off = args(Qwen3Config(sliding_window=64, use_sliding_window=False, num_hidden_layers=4))
    on = args(Qwen3Config(sliding_window=64, use_sliding_window=True, max_window_layers=1, num_hidden_layers=4))
    # transformers' Qwen3DecoderLayer: layers from max_window_layers on slide
    assert off.layer_windows == (None,) * 4 and on.layer_windows == (None, 64, 64, 64) and not off.qkv_bias


@pytest.mark.parametrize("name", MODELS)
def test_param_count_is_the_checkpoint_s(name, tiny_models):
    loaded, hf = tiny_models(name)
    args = loaded.model.args
    assert architecture(args.model_type).param_count(args) == sum(p.numel() for p in hf.parameters())


# ---- the quantization topology: every fold it allows leaves the float model's output unchanged ----


# qwen2-mha: the `v` rows fold divides the v bias too (Qwen2's and Qwen3's attention biases)
@pytest.mark.parametrize("name", [*MODELS, "qwen2-mha", "llama-gqa"])
def test_topology_folds_are_exact(name, tiny_models):
    loaded = tiny_models(name)[0]
    args = loaded.model.args
    arch = architecture(args.model_type)
    tensors = arch.read_checkpoint(loaded.folder, args, torch.float32, torch.device("cpu"))
    scaled = folded(arch, tensors, args, lambda inp: inp.foldable)
    assert scaled.keys() == tensors.keys()
    # what folds: qkv and gate_up columns and the norms before them (not OLMo 2's), down_proj and the `up` rows,
    # o_proj and the `v` rows (and bias) where every query head has its own KV head
    expected_kinds = {"down_proj", "gate_up_proj"} | ({"o_proj", "qkv_proj"} if args.num_kv_heads == 4 else set())
    if args.model_type != "olmo2":
        expected_kinds |= {"qkv_proj", "input_norm", "post_norm"}
    assert changed_kinds(tensors, scaled) == expected_kinds
    if name == "qwen2-mha":
        assert not torch.equal(scaled["layers.0.qkv_proj.bias"], tensors["layers.0.qkv_proj.bias"])
    torch.testing.assert_close(
        float_logits(arch, args, scaled), float_logits(arch, args, tensors), rtol=1e-4, atol=1e-4
    )


def test_olmo2_declares_its_residual_inputs_unfoldable(tiny_models):
    """OLMo 2's qkv_proj reads the residual stream: folding its scale into the norm before it in the layer (the
    post-attention norm, where a pre-norm model has its input norm) changes the output, so the topology offers no
    producer for it."""
    import dataclasses

    from engines.torch.models.topology import NormGroup

    assert olmo2.TOPOLOGY.unfolded == ("qkv_proj", "gate_up_proj") and not olmo2.TOPOLOGY.norm_groups
    loaded = tiny_models("olmo2-gqa")[0]
    args = loaded.model.args
    arch = architecture("olmo2")
    tensors = arch.read_checkpoint(loaded.folder, args, torch.float32, torch.device("cpu"))
    unfoldable = [i.consumers for i in LayerWeights(tensors, 0, args, arch).inputs if not i.foldable]
    assert unfoldable == [("o_proj",), ("qkv_proj",), ("gate_up_proj",)]  # o_proj: grouped-query attention
    pre_norm_placement = dataclasses.replace(
        olmo2.TOPOLOGY, norm_groups=(NormGroup("attention_out_norm", ("qkv_proj",)),), unfolded=("gate_up_proj",)
    )
    wrong = dataclasses.replace(arch, topology=pre_norm_placement)
    scaled = folded(wrong, tensors, args, lambda inp: isinstance(inp.producer, NormGroup))
    assert (float_logits(arch, args, scaled) - float_logits(arch, args, tensors)).abs().max() > 0.1
