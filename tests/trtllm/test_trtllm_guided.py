"""Structured output on the trtllm backend: kiln's StructuredOutput as TensorRT-LLM 1.0 guided decoding
(tensorrt_llm/sampling_params.py GuidedDecodingParams on SamplingParams.guided_decoding, an LLM built with
guided_decoding_backend="xgrammar"), checked against the fake. The fake validates like the real classes but does
not constrain what it generates, so these tests check what kiln passes, not constrained outputs: that needs a GPU."""

from __future__ import annotations

import re

import pytest

from engines.base import GenerationRequest, RequestFailedError, SamplingParams, StructuredOutput
from engines.trtllm import configs
from engines.trtllm.api import TrtllmUnsupported, load
from tests.trtllm.test_trtllm_engine import EOS, calls, collect, engine_dir, make, run  # noqa: F401 (fixture)

SCHEMA = '{"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}, "required": ["b"]}'
GUIDES = ("json", "regex", "grammar", "json_object", "structural_tag")


def guided(structured: StructuredOutput, **kw):
    return configs.sampling_params(load(), SamplingParams(max_tokens=8, structured=structured, **kw), [EOS], 49152)


@pytest.mark.parametrize(
    "structured, field, value, executor",
    [
        # the schema text goes on as is (the client's property order is the output's); the executor gets JSON_SCHEMA
        (StructuredOutput("json", SCHEMA), "json", SCHEMA, ("JSON_SCHEMA", SCHEMA)),
        # an object, not xgrammar's builtin JSON grammar (json_object=True), which also takes a top-level array
        (StructuredOutput("json_object"), "json", '{"type": "object"}', ("JSON_SCHEMA", '{"type": "object"}')),
        (StructuredOutput("regex", r"\d{3}-[a-z]+"), "regex", r"\d{3}-[a-z]+", ("REGEX", r"\d{3}-[a-z]+")),
        (
            StructuredOutput("grammar", 'root ::= "yes" | "no"'),
            "grammar",
            'root ::= "yes" | "no"',
            ("EBNF_GRAMMAR", 'root ::= "yes" | "no"'),
        ),
        (
            StructuredOutput("choice", choices=("a.b", "c|d", "x y")),
            "regex",
            r"(a\.b|c\|d|x y)",
            ("REGEX", r"(a\.b|c\|d|x y)"),
        ),
    ],
)
def test_each_kind_maps_to_one_guide(fake_trtllm, structured, field, value, executor):
    params = guided(structured)
    gd = params.guided_decoding
    assert isinstance(gd, load().llmapi.GuidedDecodingParams)
    assert {g: getattr(gd, g) for g in GUIDES if getattr(gd, g)} == {field: value}
    assert load().llmapi.guide_for_executor(gd) == executor
    # everything else maps as without a constraint
    plain = configs.sampling_params(load(), SamplingParams(max_tokens=8), [EOS], 49152)
    assert {k: v for k, v in params.kwargs.items() if k != "guided_decoding"} == plain.kwargs


def test_choices_escape_only_xgrammars_metacharacters():
    """xgrammar's regex dialect (cpp/regex_converter.cc) knows `\\^$.*+?()[]{}|` escaped; re.escape would also
    escape space, '-', '#', '&', '~' and whitespace, which xgrammar does not recognise."""
    assert (
        configs.choice_regex(("1+1=2?", "(a)", "[b]", "{c}", "^$", "back\\slash"))
        == r"(1\+1=2\?|\(a\)|\[b\]|\{c\}|\^\$|back\\slash)"
    )
    raw = ("x y", "a-b", "#&~", "tab\there", "new\nline", "/'\"", "é")
    assert configs.choice_regex(raw) == "(" + "|".join(raw) + ")"
    assert configs.choice_regex(raw) != "(" + "|".join(map(re.escape, raw)) + ")"
    # duplicates once; an empty choice last, where xgrammar reads "(a|)"
    assert configs.choice_regex(("", "a", "a", "b")) == "(a|b|)"


def test_choice_regex_matches_exactly_its_choices():
    testing = pytest.importorskip("xgrammar.testing")
    choices = ("1+1=2?", "x y", "a-b", "(a)|[b]", "é.", "")
    grammar = __import__("xgrammar").Grammar.from_regex(configs.choice_regex(choices))
    for choice in choices:
        assert testing._is_grammar_accept_string(grammar, choice), choice
    for other in ("1+1=22", "x  y", "a", "(a)", "éx", "a-b "):
        assert not testing._is_grammar_accept_string(grammar, other), other


def test_fake_validates_like_tensorrt_llm(fake_trtllm):
    """tensorrt_llm.sampling_params: GuidedDecodingParams._validate (run by SamplingParams.__post_init__) allows one
    guide; llmapi/llm_args.py BaseLlmArgs.guided_decoding_backend is Literal["xgrammar", "llguidance"] and
    llmapi/llm.py _TrtLLM._build_model raises for llguidance on a TensorRT engine."""
    llmapi = load().llmapi
    two = llmapi.GuidedDecodingParams(json=SCHEMA, regex="a")  # building it does not validate, as in 1.0
    with pytest.raises(ValueError, match="Only one guide can be used for a request, but got 2."):
        llmapi.SamplingParams(max_tokens=4, guided_decoding=two)
    with pytest.raises(TypeError):
        llmapi.GuidedDecodingParams("a")  # keyword-only
    with pytest.raises(ValueError, match="Input should be 'xgrammar' or 'llguidance'"):
        llmapi.LLM(model="m", guided_decoding_backend="outlines")
    with pytest.raises(ValueError, match="Unsupported guided decoding backend llguidance"):
        llmapi.LLM(model="m", guided_decoding_backend="llguidance")


def test_a_guided_request_without_a_guided_decoding_backend_fails_that_request(fake_trtllm):
    """cpp/tensorrt_llm/executor/executorImpl.cpp Executor::Impl::fetchNewRequests answers such a request with an
    error response, which GenerationExecutor._handle_background_error raises as RequestError while it streams."""
    llmapi = load().llmapi
    params = llmapi.SamplingParams(max_tokens=3, guided_decoding=llmapi.GuidedDecodingParams(regex="a+"))

    async def stream(llm):
        return [out async for out in llm.generate_async([5], sampling_params=params, streaming=True)]

    from tensorrt_llm.executor import RequestError

    with pytest.raises(RequestError, match="but GuidedDecoder is not setup"):
        run(stream(llmapi.LLM(model="m")))
    assert run(stream(llmapi.LLM(model="m", guided_decoding_backend="xgrammar")))[-1].finished


def test_the_engine_serves_structured_requests_through_xgrammar(engine_dir, fake_trtllm):
    engine = make(engine_dir)
    ((kwargs,),) = calls(fake_trtllm, "LLM")
    assert kwargs["guided_decoding_backend"] == "xgrammar"
    request = GenerationRequest("g", [1, 2], SamplingParams(max_tokens=3, structured=StructuredOutput("json", SCHEMA)))

    async def go():
        await engine.start()
        await engine.prepare(request)
        return await collect(engine, request)

    outputs = run(go())
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "length"
    assert calls(fake_trtllm, "executor guide") == [[("JSON_SCHEMA", SCHEMA)]]


def test_a_structured_request_on_an_llm_without_a_guided_decoding_backend_fails_alone(engine_dir, fake_trtllm):
    engine = make(engine_dir)
    engine.llm.kwargs.pop("guided_decoding_backend")  # an LLM started without a guided decoding backend
    request = GenerationRequest("g", [1], SamplingParams(max_tokens=3, structured=StructuredOutput("regex", "a+")))

    async def go():
        await engine.start()
        return await collect(engine, request)

    with pytest.raises(RequestFailedError, match="GuidedDecoder is not setup"):
        run(go())


@pytest.mark.parametrize(
    "structured, error, message",
    [
        (StructuredOutput("grammar", 'start: "a" | "b"'), TrtllmUnsupported, "not Lark"),
        (StructuredOutput("choice"), ValueError, "at least one choice"),
        (StructuredOutput("regex", "(a"), ValueError, "The regex constraint is not valid: Regex parsing error"),
        (StructuredOutput("grammar", 'root ::= "a" |'), ValueError, "The grammar constraint is not valid: EBNF"),
        (StructuredOutput("json", '{"type": "objekt"}'), ValueError, "The json constraint is not valid: .*objekt"),
    ],
)
def test_constraints_tensorrt_llm_cannot_take_are_refused(fake_trtllm, structured, error, message):
    if error is ValueError and "not valid" in message:
        pytest.importorskip("xgrammar")  # kiln's pre-check: in the executor, a bad guide fails the whole batch
    with pytest.raises(error, match=message):
        guided(structured)


def test_structured_requests_with_what_the_grammar_cannot_honour_are_value_errors(engine_dir, fake_trtllm):
    json_object = StructuredOutput("json_object")

    async def go(engine, request):
        await engine.start()
        return await collect(engine, request)

    engine = make(engine_dir)
    for field in (dict(ignore_eos=True), dict(min_tokens=2)):  # engines/base.py SamplingParams.validate
        with pytest.raises(ValueError, match=f"{next(iter(field))} cannot be combined with a structured output"):
            run(go(engine, GenerationRequest("e", [1], SamplingParams(structured=json_object, **field))))
    assert calls(fake_trtllm, "LLM.generate_async") == []
