"""Constrained decoding in the torch engine, on the real default model in float32: a mask keeps the logits it
allows exactly, a permissive grammar changes nothing (greedy and seeded sampling, logprobs), and grammars
compose with n > 1, seeds, prefix caching, preemption and speculative decoding (drafts checked against the
grammar). Unsupported constraints are refused with a sentence that names what is unsupported."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
import xgrammar as xgr

from engines.base import GenerationRequest, SamplingParams, StructuredOutput
from engines.torch.grammar import apply_bitmask
from tests.conftest import run_to_completion

pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
JSON_PERSON = StructuredOutput("json", json.dumps(PERSON))
# every string: the model's own output passes it untouched
ANYTHING = StructuredOutput("regex", r"[\s\S]*")


def _text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def _prompt(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
    )


def _run(core, prompt, **params):
    request = GenerationRequest("r", prompt, SamplingParams(**params))
    return run_to_completion(core, [request])["r"]


def test_the_mask_keeps_allowed_logits_bit_for_bit():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    allowed = torch.rand(4, 1000) < 0.3
    bitmask = xgr.allocate_token_bitmask(4, 1000)
    bitmask.zero_()
    for row, token in allowed.nonzero().tolist():
        bitmask[row, token // 32] |= 1 << (token % 32)
    masked = logits.clone()
    apply_bitmask(masked, bitmask)
    assert torch.equal(masked[allowed], logits[allowed])
    assert bool((masked[~allowed] == float("-inf")).all())


@pytest.mark.parametrize(
    "sampling", [dict(temperature=0.0), dict(temperature=1.0, seed=7, n=2)], ids=["greedy", "seeded-n2"]
)
def test_a_grammar_the_output_meets_anyway_changes_nothing(default_model, make_engine, sampling):
    prompt = _prompt(default_model.tokenizer, "Write two sentences about the sea.")
    params = dict(max_tokens=40, logprobs=3, **sampling)
    plain_core, constrained_core = make_engine(default_model), make_engine(default_model)
    plain = _run_with_logprobs(plain_core, prompt, params)
    constrained = _run_with_logprobs(constrained_core, prompt, params | dict(structured=ANYTHING))
    assert constrained == plain
    assert all(len(tokens) > 10 for tokens, _ in plain.values())


def _run_with_logprobs(core, prompt, params):
    core.add_request(GenerationRequest("r", prompt, SamplingParams(**params)))
    out: dict[int, tuple[list[int], list]] = {}
    while core.has_work():
        for output in core.step():
            for choice in output.outputs:
                tokens, logprobs = out.setdefault(choice.index, ([], []))
                tokens.extend(choice.new_token_ids)
                logprobs.extend((lp.token_id, lp.logprob, lp.top) for lp in choice.new_logprobs or ())
    return out


def _valid(tokenizer, ids) -> dict:
    value = json.loads(_text(tokenizer, ids))
    jsonschema.validate(value, PERSON)
    return value


def test_n_choices_with_seeds_each_follow_the_schema(default_model, make_engine):
    prompt = _prompt(default_model.tokenizer, "Describe a user of a web site as JSON.")
    core = make_engine(default_model)
    out = _run(core, prompt, temperature=1.0, seed=3, n=3, max_tokens=120, structured=JSON_PERSON)
    values = [_valid(default_model.tokenizer, out[i]) for i in range(3)]
    again = _run(
        make_engine(default_model), prompt, temperature=1.0, seed=3, n=3, max_tokens=120, structured=JSON_PERSON
    )
    assert again == out, "a seeded constrained request is reproducible"
    assert len({json.dumps(v) for v in values}) > 1, "the choices sample independently"


def test_grammar_requests_share_steps_with_plain_ones_and_the_prefix_cache(default_model, make_engine):
    tok = default_model.tokenizer
    prompt = _prompt(tok, "Describe a user of a web site as JSON. " * 4)
    core = make_engine(default_model)
    requests = [
        GenerationRequest("json", prompt, SamplingParams(temperature=0.0, max_tokens=120, structured=JSON_PERSON)),
        GenerationRequest("plain", prompt, SamplingParams(temperature=0.0, max_tokens=30)),
        GenerationRequest(
            "choice",
            prompt,
            SamplingParams(
                temperature=0.0, max_tokens=10, structured=StructuredOutput("choice", choices=("yes", "no"))
            ),
        ),
    ]
    out = run_to_completion(core, requests, arrivals={"plain": 0, "json": 1, "choice": 2})
    _valid(tok, out["json"][0])
    assert _text(tok, out["choice"][0]) in ("yes", "no")
    assert core.bm.prefix_hits > 0
    alone = _run(make_engine(default_model), prompt, temperature=0.0, max_tokens=120, structured=JSON_PERSON)
    assert out["json"] == alone


def test_preempted_grammar_requests_recompute_and_stay_valid(default_model, make_engine):
    tok = default_model.tokenizer
    core = make_engine(default_model, kv_cache_memory=14 << 20, max_num_seqs=8)  # ~300 tokens: too few for all eight
    prompts = [_prompt(tok, f"Describe user number {i} as JSON.") for i in range(8)]
    requests = [
        GenerationRequest(str(i), p, SamplingParams(temperature=0.0, max_tokens=120, structured=JSON_PERSON))
        for i, p in enumerate(prompts)
    ]
    out = run_to_completion(core, requests)
    assert core.scheduler.num_preemptions > 0
    for i in range(8):
        _valid(tok, out[str(i)][0])


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, seed=11)], ids=["greedy", "seeded"])
def test_speculative_drafts_are_checked_against_the_grammar(default_model, make_engine, sampling):
    tok = default_model.tokenizer
    # the prompt holds JSON the n-gram proposer drafts from, some of it against the schema ("role": "owner")
    prompt = _prompt(tok, 'Like {"name": "Ann", "age": 30, "role": "owner", "tags": ["x"]}, describe a user as JSON.')
    params = dict(max_tokens=120, structured=JSON_PERSON, **sampling)
    spec = make_engine(default_model, speculative_method="ngram", ngram_min=1, num_speculative_tokens=4)
    got = _run(spec, prompt, **params)
    _valid(tok, got[0])
    assert spec.spec_draft_tokens > 0
    if sampling["temperature"] == 0.0:  # greedy speculation is exact
        assert got == _run(make_engine(default_model), prompt, **params)


@pytest.mark.parametrize(
    "schema, keyword",
    [
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
        ({"type": "string", "format": "credit-card"}, "credit-card"),
        ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, "allOf"),
    ],
)
def test_unsupported_schema_keywords_are_named(default_model, make_engine, schema, keyword):
    core = make_engine(default_model)
    request = GenerationRequest("r", [1, 2, 3], SamplingParams(structured=StructuredOutput("json", json.dumps(schema))))
    with pytest.raises(ValueError, match=keyword):
        core.check_request(request)


def test_an_invalid_regex_is_a_readable_error(default_model, make_engine):
    request = GenerationRequest("r", [1, 2, 3], SamplingParams(structured=StructuredOutput("regex", "(unclosed")))
    with pytest.raises(ValueError, match="regex constraint could not be compiled"):
        make_engine(default_model).check_request(request)


class DeadEndMatcher:
    """A matcher whose grammar allows no next token at all."""

    stop_token_ids = [2, 40]

    def accept_token(self, token):
        return True

    def rollback(self, n):
        pass

    def is_terminated(self):
        return False

    def fill_next_token_bitmask(self, bitmask, index):
        bitmask[index].zero_()


def test_a_grammar_dead_end_allows_only_the_stop_tokens():
    from engines.torch.grammar import fill_bitmask

    bitmask = fill_bitmask([None, (DeadEndMatcher(), [])], 100)
    logits = torch.zeros(2, 100)
    apply_bitmask(logits, bitmask)
    assert bool((logits[0] == 0).all())
    assert (logits[1] == 0).nonzero().flatten().tolist() == [2, 40]


def test_chunked_prefill_then_the_grammar(default_model, make_engine):
    tok = default_model.tokenizer
    prompt = _prompt(tok, "Describe a user of a web site as JSON. " * 8)
    core = make_engine(default_model, max_num_batched_tokens=32)
    assert len(prompt) > 32
    out = _run(core, prompt, temperature=0.0, max_tokens=120, structured=JSON_PERSON)
    _valid(tok, out[0])
    assert out == _run(make_engine(default_model), prompt, temperature=0.0, max_tokens=120, structured=JSON_PERSON)
