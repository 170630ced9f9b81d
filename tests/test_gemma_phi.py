"""Gemma 2 and Gemma 3 (text) in the torch engine: greedy float32 output equals transformers' token for token,
alone and in a concurrent batch with a prefix-cache hit and chunked prompts (tests/test_qwen3_olmo2.py's
prompts and reference), with layers alternating sliding (window 8, shorter than every prompt but one) and global;
the window, the soft-caps and Gemma 3's local RoPE each change the output (so the parity sees them); the
quantization topology's folds are exact."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engines.torch.models import gemma
from engines.torch.models.registry import ARCHITECTURES, architecture
from engines.torch.sequence_runner import SequenceRunner
from tests.conftest import run_to_completion
from tests.test_qwen3_olmo2 import (  # noqa: F401 (reference: a fixture)
    BUDGET,
    SHARED,
    _folded,
    _logits,
    prompts,
    reference,
    requests,
)

MODELS = ["gemma2-gqa", "gemma3-gqa"]


@pytest.mark.parametrize("name", MODELS)
def test_greedy_equals_transformers_alone_and_batched(name, tiny_models, reference, make_engine):  # noqa: F811
    loaded = tiny_models(name)[0]
    expected = reference(name)

    alone = make_engine(loaded, block_size=4, enable_prefix_caching=False)
    assert not alone.runner.attention.fused_rope
    for i, request in enumerate(requests()):
        assert run_to_completion(alone, [request])[str(i)][0] == expected[i], f"prompt {i} alone diverged"

    batched = make_engine(loaded, block_size=4, enable_prefix_caching=True, max_num_batched_tokens=BUDGET)
    got = run_to_completion(batched, requests(), arrivals={"0": 0, "3": 1, "2": 2, "1": 8})
    for i in range(len(expected)):
        assert got[str(i)][0] == expected[i], f"prompt {i} in the batch diverged"
    assert batched.stats().prefix_cache_hits == SHARED


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


def test_kv_cache_and_context_are_not_capped_at_the_window(tiny_models, make_engine):
    """Global layers read the whole context: max_model_len is the model's, not the sliding window."""
    core = make_engine(tiny_models("gemma2-gqa")[0], block_size=4)
    assert core.max_model_len == 1024


@pytest.mark.parametrize("name", MODELS)
def test_param_count_is_the_checkpoint_s(name, tiny_models):
    loaded, hf = tiny_models(name)
    args = loaded.model.args
    assert architecture(args.model_type).param_count(args) == sum(p.numel() for p in hf.parameters())


def test_registry_names_the_gemma_types():
    assert ARCHITECTURES["gemma2"].model_class is ARCHITECTURES["gemma3_text"].model_class is gemma.GemmaForCausalLM
    with pytest.raises(ValueError) as info:
        architecture("gemma9")
    assert "gemma2" in str(info.value) and "gemma3_text" in str(info.value)


@pytest.mark.parametrize("name", MODELS)
def test_topology_folds_are_exact(name, tiny_models):
    loaded = tiny_models(name)[0]
    args = loaded.model.args
    arch = architecture(args.model_type)
    tensors = arch.read_checkpoint(loaded.folder, args, torch.float32, torch.device("cpu"))
    folded = _folded(arch, tensors, args, lambda inp: inp.foldable)
    changed = {n.split(".")[2] for n in tensors if not torch.equal(tensors[n], folded[n])}
    # GQA: o_proj's scale has no exact fold into the v rows; the output norms never change
    assert changed == {"qkv_proj", "input_norm", "gate_up_proj", "pre_mlp_norm", "down_proj"}
    torch.testing.assert_close(_logits(arch, args, folded), _logits(arch, args, tensors), rtol=1e-4, atol=1e-4)
