"""Sampling: seeded reproducibility inside batches, truncation bounds (property tests), penalties,
bias, min_tokens, stop ids, n > 1 and logprobs."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engines.base import GenerationRequest, SamplingParams
from engines.torch.sampler import SampleRow, sample
from tests.conftest import greedy, run_to_completion


def row(**kw) -> SampleRow:
    return SampleRow(params=SamplingParams(**kw), prompt_ids=[], output_ids=[], generator=None, blocked_ids=[])


# ---- property tests on the sampler alone -------------------------------------------------------
logit_rows = st.lists(st.floats(-8, 8, allow_nan=False), min_size=4, max_size=64)


@settings(max_examples=150, deadline=None)
@given(values=logit_rows, k=st.integers(1, 8), temperature=st.floats(0.1, 2.0))
def test_top_k_samples_only_among_k_most_likely(values, k, temperature):
    logits = torch.tensor([values])
    token = sample(logits, [row(temperature=temperature, top_k=k)]).token_ids[0]
    probs = torch.softmax(
        logits[0] / temperature, dim=-1
    )  # judged on probabilities: logits that round to one probability tie
    kth = torch.topk(probs, min(k, len(values))).values[-1]
    assert probs[token] >= kth


@settings(max_examples=150, deadline=None)
@given(values=logit_rows, p=st.floats(0.05, 1.0), temperature=st.floats(0.1, 2.0))
def test_top_p_samples_only_inside_the_nucleus(values, p, temperature):
    logits = torch.tensor([values])
    token = sample(logits, [row(temperature=temperature, top_p=p)]).token_ids[0]
    probs = torch.softmax(logits[0] / temperature, dim=-1)
    mass_strictly_above = probs[probs > probs[token]].sum().item()
    assert mass_strictly_above < p + 1e-6


@settings(max_examples=150, deadline=None)
@given(values=logit_rows, min_p=st.floats(0.0, 1.0), temperature=st.floats(0.1, 2.0))
def test_min_p_samples_only_above_the_floor(values, min_p, temperature):
    logits = torch.tensor([values])
    token = sample(logits, [row(temperature=temperature, min_p=min_p)]).token_ids[0]
    probs = torch.softmax(logits[0] / temperature, dim=-1)
    assert probs[token] >= min_p * probs.max() - 1e-6


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    tokens = sample(logits, [row(temperature=1.0) for _ in range(4000)]).token_ids
    freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)


def test_penalties_and_bias_move_logits():
    logits = torch.zeros(1, 8)
    logits[0, 3] = 1.0
    r = row(temperature=0.0, frequency_penalty=2.0)
    r.output_ids = [3, 3]
    assert sample(logits, [r]).token_ids[0] != 3
    r = row(temperature=0.0, repetition_penalty=2.0)
    r.prompt_ids = [3]
    logits[0, 5] = 0.6  # 1.0 / 2 = 0.5 < 0.6
    assert sample(logits, [r]).token_ids[0] == 5
    assert sample(logits, [row(temperature=0.0, logit_bias={7: 5.0})]).token_ids[0] == 7


def test_logprobs_are_raw_and_sorted():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    lp = sample(logits, [row(temperature=0.0, logprobs=3)]).logprobs[0]
    expected = torch.log_softmax(logits[0], -1)
    assert lp.token_id == 0 and math.isclose(lp.logprob, expected[0].item(), rel_tol=1e-6)
    assert [t for t, _ in lp.top] == [0, 1, 2]
    assert all(a >= b for (_, a), (_, b) in zip(lp.top, lp.top[1:]))


# ---- through the engine -------------------------------------------------------------------------
def sampled(seed, n=1, **kw):
    return SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=seed, max_tokens=16, ignore_eos=True, n=n, **kw)


def test_seeded_request_is_reproducible_alone_and_in_a_batch_of_8(tiny_models, make_engine):
    loaded, _ = tiny_models("llama-gqa")
    prompt = list(range(10, 40))
    alone = run_to_completion(make_engine(loaded), [GenerationRequest("s", prompt, sampled(42))])["s"][0]
    core = make_engine(loaded)
    others = [GenerationRequest(f"o{i}", list(range(50 + i, 70 + 2 * i)), sampled(None)) for i in range(7)]
    batch = run_to_completion(core, others + [GenerationRequest("s", prompt, sampled(42))], {"s": 2})
    assert batch["s"][0] == alone
    other_seed = run_to_completion(make_engine(loaded), [GenerationRequest("s", prompt, sampled(43))])["s"][0]
    assert other_seed != alone


def test_n_choices_differ_when_sampled_and_are_seeded(tiny_models, make_engine):
    loaded, _ = tiny_models("llama-gqa")
    prompt = list(range(10, 45))
    first = run_to_completion(make_engine(loaded), [GenerationRequest("n", prompt, sampled(7, n=3))])["n"]
    second = run_to_completion(make_engine(loaded), [GenerationRequest("n", prompt, sampled(7, n=3))])["n"]
    assert first == second and len(first) == 3
    assert len({tuple(v) for v in first.values()}) > 1


def test_stop_token_ids_min_tokens_and_max_tokens(tiny_models, make_engine):
    loaded, _ = tiny_models("llama-gqa")
    core = make_engine(loaded)
    prompt = list(range(3, 20))
    free = run_to_completion(core, [GenerationRequest("a", prompt, greedy(12, ignore_eos=True))])["a"][0]
    stop_at = free[4]
    first_hit = free.index(stop_at)
    core.add_request(GenerationRequest("b", prompt, greedy(12, ignore_eos=True, stop_token_ids=[stop_at])))
    outs = []
    while core.has_work():
        outs += core.step()
    final = outs[-1].outputs[0]
    tokens = [t for o in outs for t in o.outputs[0].new_token_ids]
    assert tokens == free[: first_hit + 1] and final.finish_reason == "stop" and final.stop_token_id == stop_at
    # min_tokens masks stop ids until reached
    blocked = run_to_completion(
        core,
        [
            GenerationRequest(
                "c", prompt, greedy(12, ignore_eos=True, stop_token_ids=[stop_at], min_tokens=first_hit + 2)
            )
        ],
    )["c"][0]
    assert stop_at not in blocked[: first_hit + 2]
    length = run_to_completion(core, [GenerationRequest("d", prompt, greedy(5, ignore_eos=True))])["d"][0]
    assert length == free[:5]


def test_engine_logprobs_join_the_tokens(tiny_models, make_engine):
    loaded, _ = tiny_models("llama-gqa")
    core = make_engine(loaded)
    core.add_request(GenerationRequest("lp", list(range(5, 25)), greedy(6, ignore_eos=True, logprobs=5)))
    outs = []
    while core.has_work():
        outs += core.step()
    choice_lps = [lp for o in outs for lp in o.outputs[0].new_logprobs]
    tokens = [t for o in outs for t in o.outputs[0].new_token_ids]
    assert [lp.token_id for lp in choice_lps] == tokens
    assert all(len(lp.top) == 5 and lp.top[0][0] == lp.token_id for lp in choice_lps)  # greedy picks the top


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-1),
        dict(top_p=0),
        dict(n=0),
        dict(logprobs=21),
        dict(max_tokens=0),
        dict(min_p=2),
        dict(presence_penalty=3),
        dict(min_tokens=20, max_tokens=10),
        dict(logit_bias={10**6: 1.0}),
    ],
)
def test_invalid_params_are_rejected_in_one_sentence(bad, tiny_models, make_engine):
    core = make_engine(tiny_models("llama-gqa")[0])
    with pytest.raises(ValueError) as err:
        core.add_request(GenerationRequest("x", [1, 2, 3], SamplingParams(**bad)))
    assert str(err.value).endswith(".") and "\n" not in str(err.value)


def test_prompt_plus_max_tokens_beyond_context_is_rejected(tiny_models, make_engine):
    core = make_engine(tiny_models("llama-gqa")[0], max_model_len=64)
    with pytest.raises(ValueError, match="maximum context length is 64 tokens"):
        core.add_request(GenerationRequest("x", list(range(60)), greedy(10)))
