"""Gemma 2, Gemma 3 (text) and Phi-3 / Phi-4-mini in the torch engine: greedy float32 output equals
transformers' token for token, alone and in a concurrent batch with a prefix-cache hit and chunked prompts
(tests/arch_parity.py's prompts and checks). Gemma's layers alternate sliding (window 8, shorter than
every prompt but one) and global; the window, the soft-caps and Gemma 3's local RoPE each change the output (so
the parity sees them). Phi-3 with LongRoPE; Phi-4-mini's partial RoPE on the torch path; a LongRoPE model's
context stops at original_max_position_embeddings. The quantization topology's folds are exact."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engines.torch import model_runner
from engines.torch.attention_backend import CPP_ATTENTION
from engines.torch.models import gemma, phi3
from engines.torch.models.registry import ARCHITECTURES, architecture
from engines.torch.sequence_runner import SequenceRunner
from tests.arch_parity import (
    changed_kinds,
    check_greedy_alone_and_batched,
    check_speculative_output,
    float_logits,
    folded,
    prompts,
    speculative_engine,
)

GEMMA = ["gemma2-gqa", "gemma3-gqa"]
MODELS = [*GEMMA, "phi3-longrope", "phi4-partial-rope"]
# (model, unfused attention forced) runs: Gemma and Phi-4-mini's partial RoPE always take the torch RoPE path;
# Phi-3 with whole-head RoPE runs rope_kv's fused path where the engine chooses it, and the torch path too
RUNS = [(name, False) for name in MODELS] + [("phi3-longrope", True)]


@pytest.mark.parametrize(("name", "force_unfused"), RUNS)
def test_greedy_equals_transformers_alone_and_batched(
    name, force_unfused, tiny_models, reference, make_engine, monkeypatch
):
    if force_unfused:
        monkeypatch.setattr(model_runner, "select_attention_backend", lambda *args, **kw: CPP_ATTENTION)
    unfused = name != "phi3-longrope" or force_unfused
    check_greedy_alone_and_batched(make_engine, tiny_models(name)[0], reference(name), unfused=unfused)


@pytest.mark.parametrize("setup", ["draft-same", "ngram"])
@pytest.mark.parametrize("name", ["gemma2-gqa", "gemma3-gqa", "phi4-partial-rope"])
def test_speculative_decoding_keeps_the_greedy_output(name, setup, tiny_models, reference, make_engine):
    """Verification steps score several tokens per sequence: windows and soft-caps hold there too."""
    check_speculative_output(speculative_engine(make_engine, tiny_models(name)[0], setup), reference(name))


def _variant_logits(loaded, **changes) -> torch.Tensor:
    model = loaded.model
    args = dataclasses.replace(model.args, **changes)
    arch = architecture(args.model_type)
    tensors = arch.read_checkpoint(loaded.folder, args, torch.float32, torch.device("cpu"))
    variant = arch.assemble(args, tensors, {}, torch.float32, torch.device("cpu"))
    return SequenceRunner(variant, torch.float32, torch.device("cpu"), 128).logits(prompts()[3])


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("gemma2-gqa", {"layer_windows": (None,) * 4}),
        ("gemma2-gqa", {"attn_softcap": None}),
        ("gemma2-gqa", {"final_softcap": None}),
        ("gemma3-gqa", {"layer_windows": (None,) * 4}),
        ("gemma3-gqa", {"local_inv_freq": None}),
    ],
    ids=["gemma2-window", "gemma2-attn-softcap", "gemma2-final-softcap", "gemma3-window", "gemma3-local-rope"],
)
def test_each_gemma_feature_changes_the_output(name, change, tiny_models):
    """What the parity test checks would not pass by accident: leaving out any one of them moves the logits."""
    loaded = tiny_models(name)[0]
    base = _variant_logits(loaded)
    assert (_variant_logits(loaded, **change) - base).abs().max() > 1e-2


def test_longrope_context_stops_at_the_original_length(tiny_models, make_engine):
    """Past original_max_position_embeddings transformers re-rotates the whole sequence with the long factors; kiln
    serves within it (short factors, exact) and refuses longer requests up front."""
    from engines.base import GenerationRequest
    from tests.conftest import greedy

    loaded = tiny_models("phi3-longrope")[0]
    assert loaded.model.args.max_position_embeddings == 256 < loaded.hf_config.max_position_embeddings
    core = make_engine(loaded, block_size=4)
    assert core.max_model_len == 256
    with pytest.raises(ValueError):
        core.add_request(GenerationRequest("long", list(range(3, 253)), greedy(10)))


def test_phi3_reads_default_rope_over_the_rotated_part():
    from transformers import Phi3Config

    config = Phi3Config(hidden_size=64, num_attention_heads=4, partial_rotary_factor=0.5, pad_token_id=0)
    args = phi3.phi3_args(config)
    assert args.inv_freq.shape == (4,) and args.max_position_embeddings == config.max_position_embeddings
    with torch.device("meta"):
        assert not phi3.Phi3ForCausalLM(args).fused_rope


def test_kv_cache_and_context_are_not_capped_at_the_window(tiny_models, make_engine):
    """Global layers read the whole context: max_model_len is the model's, not the sliding window."""
    core = make_engine(tiny_models("gemma2-gqa")[0], block_size=4)
    assert core.max_model_len == 1024


@pytest.mark.parametrize("name", MODELS)
def test_param_count_is_the_checkpoint_s(name, tiny_models):
    loaded, hf = tiny_models(name)
    args = loaded.model.args
    assert architecture(args.model_type).param_count(args) == sum(p.numel() for p in hf.parameters())


def test_registry_names_the_new_types():
    assert ARCHITECTURES["gemma2"].model_class is ARCHITECTURES["gemma3_text"].model_class is gemma.GemmaForCausalLM
    assert ARCHITECTURES["phi3"].model_class is phi3.Phi3ForCausalLM
    with pytest.raises(ValueError) as info:
        architecture("gemma9")
    assert all(t in str(info.value) for t in ("gemma2", "gemma3_text", "phi3"))


@pytest.mark.parametrize("name", MODELS)
def test_topology_folds_are_exact(name, tiny_models):
    loaded = tiny_models(name)[0]
    args = loaded.model.args
    arch = architecture(args.model_type)
    tensors = arch.read_checkpoint(loaded.folder, args, torch.float32, torch.device("cpu"))
    scaled = folded(arch, tensors, args, lambda inp: inp.foldable)
    changed = changed_kinds(tensors, scaled)
    # o_proj folds into the v rows only where every query head has its own KV head; Gemma's output norms never change
    expected = {"qkv_proj", "input_norm", "gate_up_proj", "down_proj"} | (
        {"o_proj"} if args.num_kv_heads == 4 else set()
    )
    assert changed == expected | ({"pre_mlp_norm"} if name in GEMMA else {"post_norm"})
    torch.testing.assert_close(
        float_logits(arch, args, scaled), float_logits(arch, args, tensors), rtol=1e-4, atol=1e-4
    )
