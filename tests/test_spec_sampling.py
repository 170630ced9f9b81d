"""Speculative sampling keeps the target's distribution: a chi-square goodness-of-fit test of the joint
distribution of the first four sampled tokens against the target's exact probabilities (computed with the
Hugging Face reference model and kiln's own sampling transform), over thousands of seeded requests.

The draft model (a different random model) proposes tokens the target often rejects, so acceptance,
rejection with resampling from norm(max(0, p - q)) and the bonus token are all exercised. The same test
on the draft's own samples must fail, which shows it can tell the two distributions apart.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from engines.base import GenerationRequest, SamplingParams
from engines.torch.sampler import SampleRow, probabilities, process_logits
from tests.conftest import run_to_completion

PROMPT = [21, 22, 23, 21, 22, 23, 21, 22]  # repetitive: the n-gram proposer finds matches in it
NUM_TOKENS = 4  # the first comes from the prefill step; tokens 2-4 from one verification of 2 drafts (+ bonus)
NUM_SAMPLES = 6000
DRAFT_NOISE = 0.1
PARAMS = {
    "top-k": dict(temperature=1.0, top_k=3),
    "top-p": dict(temperature=0.7, top_p=0.8),
}


def _params(name: str, seed: int) -> SamplingParams:
    return SamplingParams(seed=seed, max_tokens=NUM_TOKENS, ignore_eos=True, **PARAMS[name])


def exact_joint(hf_model, name: str) -> dict[tuple[int, ...], float]:
    """Probability of each 4-token continuation the target's sampler can produce, for every continuation
    whose expected count over NUM_SAMPLES is at least 5 (a prefix below that is not expanded: its
    continuations are pooled by the test anyway)."""
    row = SampleRow(_params(name, 0), [], [], None, [])

    def next_dist(prefix: tuple[int, ...]) -> dict[int, float]:
        with torch.no_grad():
            logits = hf_model(torch.tensor([PROMPT + list(prefix)])).logits[0, -1:].float()
        p = probabilities(process_logits(logits, [row]), [row])[0]
        p = p / p.sum()
        return {int(t): float(p[t]) for t in torch.nonzero(p).flatten()}

    joint = {(): 1.0}
    for _ in range(NUM_TOKENS):
        joint = {
            prefix + (t,): mass * pt
            for prefix, mass in joint.items()
            if mass * NUM_SAMPLES >= 5
            for t, pt in next_dist(prefix).items()
        }
    return joint


def chi_square_p_value(samples: list[tuple[int, ...]], expected: dict[tuple[int, ...], float]) -> float:
    """Cells with an expected count under 5 are pooled into one, as the test requires."""
    n = len(samples)
    counts: dict[tuple[int, ...], int] = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    big = [cell for cell, p in expected.items() if p * n >= 5]
    observed = [counts.get(cell, 0) for cell in big]
    wanted = [expected[cell] * n for cell in big]
    rest_obs, rest_exp = n - sum(observed), n - sum(wanted)
    if rest_exp >= 5:
        observed.append(rest_obs)
        wanted.append(rest_exp)
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, wanted))
    df = len(observed) - 1
    return float(
        torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64))
    )


def sample_many(core, name: str) -> list[tuple[int, ...]]:
    requests = [GenerationRequest(str(i), PROMPT, _params(name, 1000 + i)) for i in range(NUM_SAMPLES)]
    out = run_to_completion(core, requests)
    return [tuple(out[str(i)][0]) for i in range(NUM_SAMPLES)]


@pytest.fixture(scope="module")
def models(tiny_models):
    """The target, and a draft made from it by adding noise to every weight: close enough that about half
    of its drafts are accepted, different enough that the rest are rejected."""
    import copy

    target, target_hf = tiny_models("llama-gqa")
    draft = copy.copy(target)
    draft.model = copy.deepcopy(target.model)
    torch.manual_seed(0)
    with torch.no_grad():
        for tensor in draft.model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * DRAFT_NOISE * tensor.std())
    return target, target_hf, draft


ENGINE = dict(kv_cache_memory=64 << 20, max_num_seqs=256, max_num_batched_tokens=4096)


@pytest.mark.parametrize("name", list(PARAMS))
def test_draft_model_speculative_sampling_keeps_the_target_distribution(models, make_engine, name):
    target, target_hf, draft = models
    core = make_engine(target, draft, speculative_method="draft", num_speculative_tokens=2, **ENGINE)
    samples = sample_many(core, name)
    stats = core.stats()
    assert 0.05 < stats.spec_acceptance_rate < 0.95, "the test needs both acceptances and rejections"
    p_value = chi_square_p_value(samples, exact_joint(target_hf, name))
    assert p_value > 1e-3, f"speculative samples do not follow the target distribution (p = {p_value:.2e})"
    # Power: the draft's own samples are told apart from the target's distribution by the same test.
    draft_alone = sample_many(make_engine(draft, **ENGINE), name)
    assert chi_square_p_value(draft_alone, exact_joint(target_hf, name)) < 1e-6


def test_ngram_speculative_sampling_keeps_the_target_distribution(models, make_engine):
    target, target_hf, _ = models
    core = make_engine(target, speculative_method="ngram", ngram_min=1, ngram_max=3, num_speculative_tokens=2, **ENGINE)
    samples = sample_many(core, "top-k")
    # drafts exist whenever the first sampled token occurs in the prompt
    assert core.stats().spec_draft_tokens > NUM_SAMPLES / 10, "the n-gram proposer should have drafted often"
    assert 0 < core.stats().spec_accepted_tokens < core.stats().spec_draft_tokens
    p_value = chi_square_p_value(samples, exact_joint(target_hf, "top-k"))
    assert p_value > 1e-3, f"speculative samples do not follow the target distribution (p = {p_value:.2e})"


def test_chi_square_helper_rejects_a_wrong_distribution():
    expected = {cell: 1 / 8 for cell in itertools.product((0, 1), repeat=3)}
    skewed = [(0, 0, 0)] * 300 + [cell for cell in expected for _ in range(100)]
    assert chi_square_p_value(skewed, expected) < 1e-6
    fair = [cell for cell in expected for _ in range(100)]
    assert chi_square_p_value(fair, expected) > 0.99
