"""Sliding-window attention served past the window, as transformers computes it: Mistral (every layer) and Qwen2
with use_sliding_window (the layers from max_window_layers on), window 8 under prompts of up to 70 tokens and 32
new ones. Greedy float32 output equals transformers' token for token alone, in a concurrent batch with a
prefix-cache hit and chunked prompts, on every CPU attention path (rope_kv fused, the C++ decode kernel, the torch
path), under preemption and under speculative decoding; the window changes the output (so the parity sees it);
max_model_len is the model's, not the window."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from engines.torch import model_runner
from engines.torch.attention_backend import CPP_ATTENTION, TORCH_ATTENTION
from engines.torch.kernels import paged_attention
from engines.torch.models import llama
from engines.torch.models.registry import architecture
from engines.torch.sequence_runner import SequenceRunner
from tests.arch_parity import (
    check_greedy_alone_and_batched,
    check_speculative_output,
    prompts,
    requests,
    speculative_engine,
)
from tests.conftest import run_to_completion

FORCED = {"cpp": CPP_ATTENTION, "torch": TORCH_ATTENTION}  # else the engine's own choice (rope_kv fused here)


@pytest.mark.parametrize(
    ("name", "path"),
    [("mistral-window", "chosen"), ("mistral-window", "cpp"), ("mistral-window", "torch"), ("qwen2-window", "chosen")],
)
def test_greedy_equals_transformers_alone_and_batched(name, path, tiny_models, reference, make_engine, monkeypatch):
    if path in FORCED:
        if path == "cpp" and not paged_attention.available():
            pytest.skip("the paged-attention kernel is unavailable")
        monkeypatch.setattr(model_runner, "select_attention_backend", lambda *args, **kw: FORCED[path])
    check_greedy_alone_and_batched(make_engine, tiny_models(name)[0], reference(name), unfused=path in FORCED)


def test_windowed_models_keep_the_decode_kernels(tiny_models, make_engine):
    """A window is no reason for the torch path: Mistral runs the engine's fastest backend (rope_kv fused with the
    C++ decode kernel where they compiled); only a soft-cap is (Gemma 2, not Gemma 3)."""
    from engines.torch.kernels import rope_kv

    core = make_engine(tiny_models("mistral-window")[0], block_size=4)
    assert not core.runner.model.capped_attention
    if paged_attention.available() and rope_kv.available():
        assert core.runner.attention.fused_rope and core.runner.attention.decode_kernel is not None
    assert tiny_models("gemma2-gqa")[0].model.capped_attention
    assert not tiny_models("gemma3-gqa")[0].model.capped_attention


def test_preemption_keeps_the_greedy_output(tiny_models, reference, make_engine):
    """Preempted sequences recompute their prefill (past the window) and go on."""
    loaded = tiny_models("mistral-window")[0]
    a = loaded.model.args
    block_bytes = 2 * a.num_layers * 4 * a.num_kv_heads * a.head_dim * 4  # float32, blocks of 4 tokens
    # 40 blocks: any one request fits (at most 26), all four at once (about 67) do not
    core = make_engine(loaded, block_size=4, kv_cache_memory=40 * block_bytes, enable_prefix_caching=True)
    assert core.bm.num_blocks == 40
    got = run_to_completion(core, requests())
    assert [got[str(i)][0] for i in range(4)] == reference("mistral-window")
    assert core.stats().num_preemptions > 0


# the target drafting for itself (every draft accepted), a model without an effective window (mistral-gqa's 4096:
# drafts rejected and rolled back), n-gram lookup: verification scores several tokens per sequence past the window
@pytest.mark.parametrize("setup", ["draft-same", "draft-other", "ngram"])
def test_speculative_decoding_keeps_the_greedy_output(setup, tiny_models, reference, make_engine):
    other = tiny_models("mistral-gqa")[0] if setup == "draft-other" else None
    core = speculative_engine(make_engine, tiny_models("mistral-window")[0], setup, other)
    check_speculative_output(core, reference("mistral-window"))
    if setup == "draft-other":
        assert core.stats().spec_accepted_tokens < core.stats().spec_draft_tokens


@pytest.mark.parametrize("name", ["mistral-window", "qwen2-window"])
def test_the_window_changes_the_output(name, tiny_models):
    """What the parity test checks would not pass by accident: without the window the long prompt's logits move."""
    loaded = tiny_models(name)[0]
    args = loaded.model.args
    arch = architecture(args.model_type)
    tensors = arch.read_checkpoint(loaded.folder, args, torch.float32, torch.device("cpu"))

    def logits(windows) -> torch.Tensor:
        model = arch.assemble(dataclasses.replace(args, layer_windows=windows), dict(tensors), {}, torch.float32, "cpu")
        return SequenceRunner(model, torch.float32, torch.device("cpu"), 128).logits(prompts()[3])

    assert (logits((None,) * args.num_layers) - logits(args.layer_windows)).abs().max() > 1e-2


def test_context_is_the_model_s_not_the_window(tiny_models, make_engine):
    core = make_engine(tiny_models("mistral-window")[0], block_size=4)
    assert core.max_model_len == 1024  # max_position_embeddings; the window is 8


def test_layer_windows_follow_transformers():
    """transformers' rule per family (its modeling code): Mistral and Phi-3 window every layer; Qwen2 and Qwen3 the
    layers from max_window_layers on, and none without use_sliding_window; Llama none."""
    from transformers import LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

    def windows(config):
        return architecture(config.model_type).args_from_config(config).layer_windows

    assert windows(MistralConfig(num_hidden_layers=3, sliding_window=16)) == (16, 16, 16)
    assert windows(MistralConfig(num_hidden_layers=2, sliding_window=None)) == (None, None)
    assert windows(Phi3Config(num_hidden_layers=2, sliding_window=32, pad_token_id=0)) == (32, 32)
    qwen2 = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=16, max_window_layers=2)
    assert windows(qwen2) == (None, None, 16, 16)
    assert windows(Qwen2Config(num_hidden_layers=2, sliding_window=16)) == (None, None)
    assert windows(Qwen3Config(num_hidden_layers=2, use_sliding_window=True, max_window_layers=0)) == (4096, 4096)
    assert windows(LlamaConfig(num_hidden_layers=2)) == (None, None)
    hybrid = SimpleNamespace(num_hidden_layers=2, sliding_window=8, layer_types=["full_attention", "linear_attention"])
    with pytest.raises(ValueError, match="linear_attention"):
        llama.layer_windows(hybrid)
