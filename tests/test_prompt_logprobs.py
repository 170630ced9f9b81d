"""Prompt logprobs on the real default model in float32 equal Hugging Face transformers' log-softmax at every
prompt position (within 1e-4), for a prompt computed in one step, in chunks (longer than the step budget), after
a prefix-cache hit (the cached prefix is recomputed), under preemption, and with n > 1 (reported once)."""

from __future__ import annotations

import pytest
import torch

from engines.base import GenerationRequest, SamplingParams

pytestmark = pytest.mark.slow

TOP = 3


@pytest.fixture(scope="module")
def prompt(default_model) -> list[int]:
    text = "The quick brown fox jumps over the lazy dog. " * 12 + "Paris is the capital of"
    return default_model.tokenizer(text)["input_ids"]


@pytest.fixture(scope="module")
def reference(default_hf_model, prompt) -> torch.Tensor:
    with torch.no_grad():
        logits = default_hf_model(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def _prompt_logprobs(core, prompt, **params):
    core.add_request(GenerationRequest("r", prompt, SamplingParams(max_tokens=2, prompt_logprobs=TOP, **params)))
    found = []
    while core.has_work():
        found += [out.prompt_logprobs for out in core.step() if out.prompt_logprobs is not None]
    assert len(found) == 1, "prompt logprobs come once, with the first output"
    return found[0]


def _check(entries, prompt, reference):
    assert len(entries) == len(prompt) and entries[0] is None
    for position, entry in enumerate(entries[1:], start=1):
        expected = reference[position - 1]
        assert entry.token_id == prompt[position]
        assert abs(entry.logprob - expected[prompt[position]].item()) < 1e-4, position
        values, ids = expected.topk(TOP)
        assert [t for t, _ in entry.top] == ids.tolist()
        assert max(abs(lp - v) for (_, lp), v in zip(entry.top, values.tolist())) < 1e-4


def test_one_step(default_model, make_engine, prompt, reference):
    _check(_prompt_logprobs(make_engine(default_model), prompt), prompt, reference)


def test_chunked_prefill(default_model, make_engine, prompt, reference):
    core = make_engine(default_model, max_num_batched_tokens=32)
    assert len(prompt) > 32
    _check(_prompt_logprobs(core, prompt), prompt, reference)


def test_after_a_prefix_cache_hit(default_model, make_engine, prompt, reference):
    core = make_engine(default_model)
    core.add_request(GenerationRequest("warm", prompt, SamplingParams(max_tokens=1)))
    while core.has_work():
        core.step()
    hits = core.bm.prefix_hits
    _check(_prompt_logprobs(core, prompt), prompt, reference)
    assert core.bm.prefix_hits == hits, "the cached prefix is recomputed, not reused"


def test_n_choices_and_seeds(default_model, make_engine, prompt, reference):
    _check(_prompt_logprobs(make_engine(default_model), prompt, n=3, temperature=1.0, seed=1), prompt, reference)


def test_preemption(default_model, make_engine, prompt, reference):
    core = make_engine(default_model, kv_cache_memory=12 << 20, max_num_batched_tokens=32)  # ~256 tokens of KV
    others = [
        GenerationRequest(f"o{i}", prompt[:40], SamplingParams(max_tokens=120, ignore_eos=True, temperature=0))
        for i in range(3)
    ]
    for request in others:
        core.add_request(request)
    entries = _prompt_logprobs(core, prompt)
    assert core.scheduler.num_preemptions > 0
    _check(entries, prompt, reference)


def test_ranks(default_model, make_engine, prompt, reference):
    entries = _prompt_logprobs(make_engine(default_model), prompt)
    for position, entry in enumerate(entries[1:], start=1):
        expected = reference[position - 1]
        assert entry.rank == int((expected > expected[prompt[position]]).sum()) + 1


def test_with_speculative_decoding(default_model, make_engine, prompt, reference):
    core = make_engine(default_model, speculative_method="ngram", ngram_min=1, max_num_batched_tokens=32)
    _check(_prompt_logprobs(core, prompt, temperature=0.0), prompt, reference)
