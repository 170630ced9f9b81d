"""Greedy float32 output equals Hugging Face transformers `generate(do_sample=False)` token for token."""

import pytest
import torch

from engines.base import GenerationRequest
from tests.conftest import TINY_CONFIGS, greedy, run_to_completion


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int, eos: bool) -> list[int]:
    kwargs = {} if eos else {"eos_token_id": None, "min_new_tokens": max_new_tokens}
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_tiny_models_match_transformers(name, tiny_models, make_engine):
    loaded, hf = tiny_models(name)
    core = make_engine(loaded, block_size=4)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (1, 5, 16, 37, 90)]
    requests = [GenerationRequest(str(i), p, greedy(24, ignore_eos=True)) for i, p in enumerate(prompts)]
    got = run_to_completion(core, requests)
    for i, p in enumerate(prompts):
        assert got[str(i)][0] == hf_greedy(hf, p, 24, eos=False), f"prompt {i} ({len(p)} tokens) diverged"


@pytest.mark.slow
def test_default_model_matches_transformers(default_model, default_hf_model, chat_prompts, make_engine):
    assert len(chat_prompts) >= 8 and min(map(len, chat_prompts)) >= 20 and max(map(len, chat_prompts)) <= 600
    core = make_engine(default_model, kv_cache_memory=256 << 20)
    requests = [GenerationRequest(str(i), p, greedy(64, ignore_eos=True)) for i, p in enumerate(chat_prompts)]
    got = run_to_completion(core, requests)
    for i, p in enumerate(chat_prompts):
        expected = hf_greedy(default_hf_model, p, 64, eos=False)
        assert got[str(i)][0] == expected, f"chat prompt {i} ({len(p)} tokens) diverged"


@pytest.mark.slow
def test_default_model_stops_at_eos_like_transformers(default_model, default_hf_model, chat_prompts, make_engine):
    core = make_engine(default_model, kv_cache_memory=256 << 20)
    prompt = chat_prompts[1]
    got = run_to_completion(core, [GenerationRequest("eos", prompt, greedy(96))])["eos"][0]
    expected = hf_greedy(default_hf_model, prompt, 96, eos=True)
    assert got == expected
    assert got[-1] in core.eos_token_ids and len(got) < 96, "the answer should end with EOS before the limit"


@pytest.mark.slow
def test_default_model_holds_one_copy_of_its_weights(default_model):
    model = default_model.model
    assert model.lm_head_weight.data_ptr() == model.embed_tokens.weight.data_ptr(), "tied embeddings are shared"
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    n_params = 134_515_008  # SmolLM2-135M with tied embeddings
    assert sum(storages.values()) == n_params * 4


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_engines_stay_close_to_float32(dtype, default_model, chat_prompts, make_engine):
    """bf16/fp16 (bf16 decode runs kiln's CPU kernel) can't match float32 bit for bit; their greedy
    answers must still agree with float32 on most tokens and keep the facts."""
    from engines.config import EngineConfig
    from engines.torch.loader import load_model

    half = load_model(EngineConfig(dtype=dtype))
    prompts = chat_prompts[:4]
    requests = lambda: [GenerationRequest(str(i), p, greedy(24, ignore_eos=True)) for i, p in enumerate(prompts)]  # noqa: E731
    ref = run_to_completion(make_engine(default_model), requests())
    got = run_to_completion(make_engine(half), requests())
    same = sum(a == b for i in ref for a, b in zip(ref[i][0], got[i][0]))
    assert same / (24 * len(prompts)) >= 0.5
    answer = half.tokenizer.decode(got["1"][0])  # "What is the capital of France ..."
    assert "Paris" in answer
