"""In-flight batching, prefix caching, chunked prefill and preemption change nothing in the output."""

import pytest

from engines.base import GenerationRequest
from tests.conftest import greedy, run_to_completion

pytestmark = pytest.mark.slow

MAX_TOKENS = 24
BLOCK_BYTES = 2 * 30 * 16 * 3 * 64 * 4  # SmolLM2-135M, float32: K and V, 30 layers, 3 KV heads of 64


def sequential(core, prompts, max_tokens=MAX_TOKENS):
    results = {}
    for i, p in enumerate(prompts):
        results.update(run_to_completion(core, [GenerationRequest(str(i), p, greedy(max_tokens, ignore_eos=True))]))
    return results


def together(core, prompts, arrivals=None, max_tokens=MAX_TOKENS):
    requests = [GenerationRequest(str(i), p, greedy(max_tokens, ignore_eos=True)) for i, p in enumerate(prompts)]
    return run_to_completion(core, requests, arrivals)


@pytest.fixture(scope="module")
def reference(default_model, chat_prompts):
    from engines.config import EngineConfig
    from engines.torch.loader import build_core

    core = build_core(EngineConfig(kv_cache_memory=256 << 20, enable_prefix_caching=False), default_model)
    return sequential(core, chat_prompts)


def test_staggered_concurrent_arrivals_equal_sequential(default_model, chat_prompts, reference, make_engine):
    core = make_engine(default_model, kv_cache_memory=256 << 20, enable_prefix_caching=False)
    arrivals = {str(i): 3 * i for i in range(len(chat_prompts))}  # each joins a batch already decoding
    assert together(core, chat_prompts, arrivals) == reference
    assert core.num_steps < sum(len(v[0]) for v in reference.values()), "requests did not share steps"


def test_prefix_caching_on_equals_off_and_hits(default_model, chat_prompts, reference, make_engine):
    core = make_engine(default_model, kv_cache_memory=256 << 20, enable_prefix_caching=True)
    # Every SmolLM2 chat prompt starts with the same default system prompt; prompts 6 and 7 share a passage.
    assert sequential(core, chat_prompts) == reference
    stats = core.stats()
    assert stats.prefix_cache_hits > 0 and stats.prefix_cache_queries >= stats.prefix_cache_hits
    # A repeated prompt is served from the cache except its last token.
    before = core.stats().prefix_cache_hits
    again = run_to_completion(core, [GenerationRequest("again", chat_prompts[7], greedy(MAX_TOKENS, ignore_eos=True))])
    assert again["again"] == reference["7"]
    hit = core.stats().prefix_cache_hits - before
    assert hit == (len(chat_prompts[7]) - 1) // 16 * 16


def test_chunked_prefill_small_budget_equals_unchunked(default_model, chat_prompts, reference, make_engine):
    core = make_engine(default_model, kv_cache_memory=256 << 20, max_num_batched_tokens=40, enable_prefix_caching=False)
    arrivals = {str(i): i for i in range(len(chat_prompts))}
    assert together(core, chat_prompts, arrivals) == reference


SHORT = [0, 1, 2, 3, 4, 5, 8]  # the prompts under 100 tokens


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preemption_under_small_pool_loses_nothing(default_model, chat_prompts, reference, make_engine, prefix_caching):
    # 20 blocks of 16 tokens: the 7 short prompts fill it and their answers need ~8 more blocks.
    core = make_engine(default_model, kv_cache_memory=20 * BLOCK_BYTES, enable_prefix_caching=prefix_caching)
    assert core.bm.num_blocks == 20
    got = together(core, [chat_prompts[i] for i in SHORT])
    assert [got[str(j)] for j in range(len(SHORT))] == [reference[str(i)] for i in SHORT]
    assert core.stats().num_preemptions > 0


def test_n_choices_share_prompt_blocks(default_model, chat_prompts, make_engine):
    core = make_engine(default_model, kv_cache_memory=256 << 20, enable_prefix_caching=False)
    prompt = chat_prompts[6]  # 310 tokens: 19 full blocks + a partial one
    core.add_request(GenerationRequest("n", prompt, greedy(8, ignore_eos=True, n=3)))
    first = core.step()  # prefill + fork
    tables = [s.block_table for s in core.requests["n"].seqs]
    assert len(tables) == 3
    shared = len(prompt) // 16
    assert tables[0][:shared] == tables[1][:shared] == tables[2][:shared]
    assert len({t[shared] for t in tables}) == 3, "the partial block is copied per choice"
    out = {}
    while first or core.has_work():
        for o in first or core.step():
            for c in o.outputs:
                out.setdefault(c.index, []).extend(c.new_token_ids)
        first = None
    # greedy choices are identical and equal a single greedy run
    single = run_to_completion(core, [GenerationRequest("one", prompt, greedy(8, ignore_eos=True))])["one"][0]
    assert out[0] == out[1] == out[2] and len(out[0]) == 8
    assert single == out[0][: len(single)]
