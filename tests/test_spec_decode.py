"""Speculative decoding (draft model and n-gram) changes nothing in greedy output, keeps the block
accounting of both KV pools exact through rejections, aborts and preemption, and counts what it did."""

from __future__ import annotations

import pytest
import torch

from engines.base import GenerationRequest, SamplingParams
from engines.torch.loader import LoadedModel
from engines.torch.spec.ngram import NgramProposer
from tests.conftest import check_block_accounting, greedy, run_to_completion

# Repetitive prompts give the n-gram proposer matches; the last one has none to find.
PROMPTS = [
    [5, 6, 7, 8, 9] * 3 + [5, 6],
    [11, 12, 13, 14] * 5,
    [40, 41, 42, 43, 40, 41, 50, 51, 40, 41, 42, 60],
    list(range(100, 140)),
]
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def target(tiny_models) -> LoadedModel:
    return tiny_models("llama-gqa")[0]


@pytest.fixture(scope="module")
def other_model(tiny_models) -> LoadedModel:
    """A different random model with the same vocabulary: a draft the target mostly rejects."""
    return tiny_models("llama-mha")[0]


@pytest.fixture(scope="module")
def int8_copy(target) -> LoadedModel:
    """The target's INT8 weight-only build, made in memory: a draft that agrees often but not always."""
    from engines.build.quantize import quantize_model
    from engines.torch.models.llama import LlamaArgs, assemble, read_hf_checkpoint

    args = LlamaArgs.from_hf_config(target.hf_config)
    q = quantize_model(
        read_hf_checkpoint(target.folder, args, torch.float32, target.device), args, "int8-wo", None, progress=False
    )
    model = assemble(args, dict(q.tensors), q.formats, torch.float32, target.device)
    return LoadedModel(model, target.hf_config, None, "int8-copy", target.folder, torch.float32, target.device)


def _requests(prompts, params=None, speculative=True):
    params = params or (lambda i: greedy(MAX_TOKENS, ignore_eos=True))
    return [GenerationRequest(str(i), p, params(i), speculative=speculative) for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def reference(target):
    """Greedy output without speculation, each request alone."""
    from engines.config import EngineConfig
    from engines.torch.loader import build_core

    core = build_core(EngineConfig(kv_cache_memory=16 << 20), target)
    out = {}
    for request in _requests(PROMPTS):
        out.update(run_to_completion(core, [request]))
    return out


SPEC_SETUPS = {
    "ngram": dict(speculative_method="ngram", ngram_min=1, ngram_max=3),
    "draft-same": dict(speculative_method="draft"),
    "draft-int8": dict(speculative_method="draft"),
    "draft-other": dict(speculative_method="draft", num_speculative_tokens=3),
}


@pytest.fixture
def spec_engine(make_engine, target, other_model, int8_copy):
    drafts = {"draft-same": target, "draft-int8": int8_copy, "draft-other": other_model}

    def make(setup: str, **overrides):
        settings = dict(kv_cache_memory=16 << 20) | SPEC_SETUPS[setup] | overrides
        return make_engine(target, drafts.get(setup), **settings)

    return make


@pytest.mark.parametrize("setup", list(SPEC_SETUPS))
def test_greedy_alone_equals_no_speculation(spec_engine, reference, setup):
    core = spec_engine(setup)
    for request in _requests(PROMPTS):
        assert run_to_completion(core, [request]) == {request.request_id: reference[request.request_id]}
        check_block_accounting(core)
    stats = core.stats()
    assert stats.spec_draft_tokens > 0
    if setup == "draft-same":  # the target drafting for itself: every draft is accepted
        assert stats.spec_accepted_tokens == stats.spec_draft_tokens
        assert core.num_steps < len(PROMPTS) * MAX_TOKENS / 3
    if setup in ("draft-other", "draft-int8", "ngram"):  # these must exercise rejection and rollback
        assert stats.spec_accepted_tokens < stats.spec_draft_tokens


@pytest.mark.parametrize("setup", list(SPEC_SETUPS))
def test_greedy_concurrent_batch_mixed_with_opt_outs_equals_no_speculation(spec_engine, reference, setup):
    core = spec_engine(setup)
    requests = _requests(PROMPTS)
    requests[1].speculative = False  # shares steps with speculating requests
    arrivals = {"0": 0, "1": 0, "2": 3, "3": 7}  # later ones join a batch already verifying drafts
    assert run_to_completion(core, requests, arrivals) == reference
    assert core.stats().spec_draft_tokens > 0


def test_opt_out_request_is_never_drafted_for(spec_engine):
    core = spec_engine("draft-same")
    run_to_completion(core, _requests(PROMPTS[:1], speculative=False))
    assert core.stats().spec_draft_tokens == 0


def test_preemption_and_small_token_budget_lose_nothing(spec_engine, reference):
    # 2 layers x 2 KV heads x 16 dims x 4 bytes x 2 (K, V) x 16 tokens = 8 KiB per block; 12 blocks is tight
    core = spec_engine("draft-other", kv_cache_memory=12 * 8192, max_num_batched_tokens=24)
    assert run_to_completion(core, _requests(PROMPTS)) == reference
    assert core.stats().num_preemptions > 0


@pytest.mark.parametrize("setup", ["ngram", "draft-int8"])
def test_aborts_mid_speculation_free_both_pools(spec_engine, setup):
    core = spec_engine(setup)
    for request in _requests(PROMPTS):
        core.add_request(request)
    for step in range(6):
        core.step()
        check_block_accounting(core)
        if step == 2:
            assert core.abort_request("0").outputs[0].finish_reason == "abort"
    for request_id in list(core.requests):
        core.abort_request(request_id)
    check_block_accounting(core)
    assert core.bm.num_used == 0
    if setup.startswith("draft"):
        assert core.proposer.bm.num_used == 0 and not core.proposer.states


def test_stops_inside_accepted_drafts_end_the_sequence_there(spec_engine, reference):
    """A stop token or max_tokens reached in the middle of the accepted drafts ends the output exactly there."""
    full = reference["1"][0]
    stop_at = 9
    for params in (
        greedy(stop_at + 1, ignore_eos=True),
        greedy(MAX_TOKENS, ignore_eos=True, stop_token_ids=[full[stop_at]]),
    ):
        core = spec_engine("draft-same")
        got = run_to_completion(core, [GenerationRequest("1", PROMPTS[1], params)])["1"][0]
        first = full.index(full[stop_at]) if params.stop_token_ids else stop_at
        assert got == full[: first + 1]


def test_penalties_min_tokens_and_logprobs_under_speculation(spec_engine, target, make_engine):
    """Positions after a draft see the drafts as generated tokens: penalties, min_tokens and logprobs agree."""
    params = lambda i: greedy(24, repetition_penalty=1.3, frequency_penalty=0.5, min_tokens=10, logprobs=3)  # noqa: E731
    plain = make_engine(target, kv_cache_memory=16 << 20)
    spec = spec_engine("draft-same")
    want, got = [], []
    for core, sink in ((plain, want), (spec, got)):
        for request in _requests(PROMPTS[:2], params):
            core.add_request(request)
        while core.has_work():
            for out in core.step():
                sink.extend((out.request_id, lp.token_id, lp.logprob, lp.top) for lp in out.outputs[0].new_logprobs)
    assert [w[:2] for w in sorted(want)] == [g[:2] for g in sorted(got)]
    for w, g in zip(sorted(want), sorted(got)):
        assert g[2] == pytest.approx(w[2], abs=1e-4)
        assert [t for t, _ in g[3]] == [t for t, _ in w[3]]
    assert spec.stats().spec_accepted_tokens > 0


def test_n_choices_and_sampling_keep_accounting(spec_engine):
    core = spec_engine("draft-int8")
    params = lambda i: SamplingParams(n=3, temperature=0.8, top_p=0.9, seed=i, max_tokens=20, ignore_eos=True)  # noqa: E731
    out = run_to_completion(core, _requests(PROMPTS, params))
    assert all(len(choices) == 3 and all(len(t) == 20 for t in choices.values()) for choices in out.values())
    assert core.stats().spec_draft_tokens > 0


def test_seeded_sampling_is_reproducible_under_speculation(spec_engine):
    params = lambda i: SamplingParams(temperature=1.0, seed=7 + i, max_tokens=24, ignore_eos=True)  # noqa: E731
    first = run_to_completion(spec_engine("draft-int8"), _requests(PROMPTS, params))
    second = run_to_completion(
        spec_engine("draft-int8"), _requests(PROMPTS[::-1], lambda i: params(len(PROMPTS) - 1 - i))
    )
    assert [first[str(i)] for i in range(len(PROMPTS))] == [
        second[str(len(PROMPTS) - 1 - i)] for i in range(len(PROMPTS))
    ]


def test_max_tokens_is_never_exceeded(spec_engine):
    core = spec_engine("draft-same", num_speculative_tokens=8)
    out = run_to_completion(core, _requests(PROMPTS, lambda i: greedy(3 + i, ignore_eos=True)))
    assert [len(out[str(i)][0]) for i in range(len(PROMPTS))] == [3, 4, 5, 6]


def test_stats_count_drafts_and_acceptance(spec_engine):
    core = spec_engine("draft-int8")
    run_to_completion(core, _requests(PROMPTS))
    stats = core.stats()
    assert 0 < stats.spec_accepted_tokens <= stats.spec_draft_tokens <= 4 * stats.spec_num_drafts
    assert stats.spec_acceptance_rate == stats.spec_accepted_tokens / stats.spec_draft_tokens
    assert stats.spec_mean_accepted_length == stats.spec_accepted_tokens / stats.spec_num_drafts
    # every generated token came from a verification or a plain step
    assert stats.generation_tokens == len(PROMPTS) * MAX_TOKENS


# ---- the n-gram proposer ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "tokens, k, expected",
    [
        ([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 2, [7, 1]),  # the latest earlier match wins
        ([1, 2, 3, 4, 8, 3, 4, 6, 2, 3, 4], 3, [8, 3, 4]),  # the longest suffix (2 3 4) beats the latest (3 4)
        ([1, 2, 3, 4, 5], 3, None),  # nothing repeats
        ([5, 5], 4, [5]),  # the continuation may be shorter than k
        ([7], 4, None),
    ],
)
def test_ngram_lookup(tokens, k, expected):
    proposal = NgramProposer(1, 3).lookup(tokens, k)
    assert (proposal.token_ids if proposal else None) == expected


def test_ngram_min_window_ignores_short_matches():
    assert NgramProposer(2, 3).lookup([1, 2, 3, 9, 4, 3], 2) is None
    assert NgramProposer(1, 3).lookup([1, 2, 3, 9, 4, 3], 2).token_ids == [9, 4]


# ---- configuration errors -----------------------------------------------------------------------
def test_draft_with_another_vocabulary_is_refused(tmp_path, target, make_engine):
    from transformers import AutoConfig, LlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    from engines.torch.loader import load_checkpoint

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    HFLlama(config).save_pretrained(tmp_path)
    cfg = AutoConfig.from_pretrained(tmp_path)
    small = LoadedModel(
        load_checkpoint(tmp_path, cfg, torch.float32, target.device),
        cfg,
        None,
        "small",
        tmp_path,
        torch.float32,
        target.device,
    )
    with pytest.raises(ValueError, match="does not share the target's tokenizer"):
        make_engine(target, small, speculative_method="draft")


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(speculative_method="medusa"), "speculative_method must be draft or ngram"),
        (dict(speculative_method="eagle"), "speculative_method must be draft or ngram"),
        (dict(speculative_method="ngram", num_speculative_tokens=0), "num_speculative_tokens must be between 1"),
        (dict(speculative_method="ngram", ngram_min=3, ngram_max=2), "ngram_min <= ngram_max"),
        (dict(speculative_draft="/x"), "speculative_method is not"),
        (dict(speculative_method="draft"), "needs the draft"),
    ],
)
def test_bad_speculative_settings_are_one_sentence(target, make_engine, settings, message):
    with pytest.raises(ValueError, match=message):
        make_engine(target, **settings)


def test_per_position_counts_and_alpha(spec_engine):
    core = spec_engine("draft-int8")
    run_to_completion(core, _requests(PROMPTS))
    stats = core.stats()
    checked, accepted = stats.spec_checked_per_position, stats.spec_accepted_per_position
    assert len(checked) == len(accepted) == 4
    assert sum(accepted) == stats.spec_accepted_tokens
    assert checked[0] == stats.spec_num_drafts  # the first draft of every verification is checked
    # a position is checked only when the one before it was accepted
    assert all(c <= a for c, a in zip(checked[1:], accepted[:-1]))
    assert stats.spec_alpha == sum(accepted) / sum(checked)


def test_which_chunks_run_as_decode_rows():
    """Decodes, verifications and a draft's catch-up use the decode kernel; prompt chunks (also the rest of
    a prompt after a prefix-cache hit) keep SDPA, so a cache hit computes exactly what a cold prefill does."""
    from types import SimpleNamespace

    from engines.torch.scheduler import MAX_DECODE_ROWS, ScheduledChunk

    fresh, started = SimpleNamespace(num_computed_tokens=0), SimpleNamespace(num_computed_tokens=32)
    assert ScheduledChunk(started, 1).runs_as_decode_rows
    assert ScheduledChunk(started, 1, [5, 6, 7]).runs_as_decode_rows
    assert ScheduledChunk(started, 3, catch_up=True).runs_as_decode_rows
    assert not ScheduledChunk(started, 3).runs_as_decode_rows  # a prompt's rest after a prefix hit
    assert not ScheduledChunk(fresh, 1).runs_as_decode_rows  # a one-token prompt
    assert not ScheduledChunk(started, MAX_DECODE_ROWS + 1, catch_up=True).runs_as_decode_rows
