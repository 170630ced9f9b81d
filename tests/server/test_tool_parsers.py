"""Tool-call parsing (server/tools): each model format read whole and streamed, the fallback prompt for templates
without tools, and the `tool_choice: "required"` array streamer. The property tests cut outputs into deltas
anywhere and check that a stream adds up to exactly what reading the whole output finds."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.tools.calls import ParsedCall, ParsedOutput
from server.tools.events import ContentDelta, ToolCallDelta, new_call_id
from server.tools.fallback_prompt import (
    render_tool_calls_as_text,
    render_tool_result,
    template_supports_tools,
    tool_system_prompt,
)
from server.tools.hermes import HermesParser
from server.tools.llama3_json import Llama3JsonParser
from server.tools.mistral import MistralParser
from server.tools.registry import PARSERS, parser_for_template
from server.tools.required_stream import RequiredCallsStreamer, parse_required


# ---- helpers --------------------------------------------------------------------------------------------------
def counting_ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def run_stream(streamer, deltas: list[str]) -> list:
    events = []
    for delta in deltas:
        events += streamer.feed(delta)
    return events + streamer.finish()


def reassemble(events) -> ParsedOutput:
    """What a client makes of the events, checking on the way that they are shaped as OpenAI streams them."""
    content, names, arguments = [], {}, {}
    for event in events:
        if isinstance(event, ContentDelta):
            assert event.text
            content.append(event.text)
        elif event.id is not None:  # a call's first delta
            assert event.index == len(names) and event.name and event.arguments == ""
            names[event.index], arguments[event.index] = event.name, ""
        else:
            assert event.index in names and event.name is None
            arguments[event.index] += event.arguments
    return ParsedOutput("".join(content) or None, [ParsedCall(names[i], arguments[i]) for i in sorted(names)])


def cut(text: str, cuts: list[int]) -> list[str]:
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def hermes_call(name, arguments) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


# ---- hermes ---------------------------------------------------------------------------------------------------
def test_hermes_single_call():
    parsed = HermesParser.parse(hermes_call("get_weather", {"city": "Paris", "days": 3}))
    assert parsed == ParsedOutput(None, [ParsedCall("get_weather", '{"city":"Paris","days":3}')])


def test_hermes_parallel_calls_and_content_around_them():
    text = "Let me check.\n" + hermes_call("a", {"x": 1}) + "\n" + hermes_call("b", {}) + "\nDone."
    parsed = HermesParser.parse(text)
    assert parsed.content == "Let me check.\n\n\nDone."
    assert parsed.calls == [ParsedCall("a", '{"x":1}'), ParsedCall("b", "{}")]


@pytest.mark.parametrize(
    "body",
    [
        '{"name": "f", "arguments": {"x": 1}',
        '{"arguments": {}}',
        '{"name": "", "arguments": {}}',
        '{"name": "f", "arguments": [1]}',
        '["f"]',
        "call f please",
    ],
)
def test_hermes_malformed_call_stays_content(body):
    text = f"Hi <tool_call>{body}</tool_call>"
    assert HermesParser.parse(text) == ParsedOutput(text, [])


def test_hermes_malformed_call_does_not_hide_the_next():
    text = "<tool_call>oops</tool_call>" + hermes_call("f", {})
    assert HermesParser.parse(text) == ParsedOutput("<tool_call>oops</tool_call>", [ParsedCall("f", "{}")])


def test_hermes_missing_arguments_is_a_call_without_parameters():
    assert HermesParser.parse('<tool_call>{"name": "now"}</tool_call>').calls == [ParsedCall("now", "{}")]


@pytest.mark.parametrize("ending", ["", "\n", "\n</tool", "\n</tool_call"])
def test_hermes_unterminated_final_call_with_complete_json(ending):
    text = 'Sure. <tool_call>\n{"name": "f", "arguments": {"q": 1}}' + ending
    assert HermesParser.parse(text) == ParsedOutput("Sure.", [ParsedCall("f", '{"q":1}')])


def test_hermes_unterminated_incomplete_call_is_content():
    text = '<tool_call>\n{"name": "f", "argum'
    assert HermesParser.parse(text) == ParsedOutput(text, [])


def test_hermes_unicode_arguments_stay_unescaped():
    parsed = HermesParser.parse(hermes_call("say", {"text": "héllo 世界 🙂", "quote": 'a "b"'}))
    assert parsed.calls[0].arguments == '{"text":"héllo 世界 🙂","quote":"a \\"b\\""}'
    assert json.loads(parsed.calls[0].arguments) == {"text": "héllo 世界 🙂", "quote": 'a "b"'}


def test_hermes_plain_text():
    assert HermesParser.parse("  just words \n") == ParsedOutput("just words", [])
    assert HermesParser.parse("   ") == ParsedOutput(None, [])


def test_hermes_stream_sends_content_before_a_call_at_once():
    streamer = HermesParser.streaming(counting_ids())
    assert streamer.feed("Let me look") == [ContentDelta("Let me look")]
    assert streamer.feed(" that up. <tool_") == [ContentDelta(" that up.")]  # the space waits: it may be trailing
    assert streamer.feed('call>{"name": "f", ') == []
    assert streamer.feed('"arguments": {"a": 1}}</tool_call>') == [
        ToolCallDelta(0, "call_0", "f", ""),
        ToolCallDelta(0, None, None, '{"a":1}'),
    ]
    assert streamer.feed(hermes_call("g", {})) == [
        ToolCallDelta(1, "call_1", "g", ""),
        ToolCallDelta(1, None, None, "{}"),
    ]
    assert streamer.finish() == []


def test_hermes_stream_releases_a_marker_prefix_that_turns_out_to_be_text():
    streamer = HermesParser.streaming()
    assert streamer.feed("Use a <tool") == [ContentDelta("Use a")]
    assert streamer.feed("box>!") == [ContentDelta(" <toolbox>!")]
    assert streamer.feed(" <tool_call") == []
    assert streamer.finish() == [ContentDelta(" <tool_call")]


def test_hermes_stream_holds_an_unterminated_call_until_the_end():
    streamer = HermesParser.streaming(counting_ids())
    assert streamer.feed('<tool_call>{"name": "f", "arguments": {}}') == []
    assert streamer.finish() == [ToolCallDelta(0, "call_0", "f", ""), ToolCallDelta(0, None, None, "{}")]


def test_stream_events_as_openai_deltas():
    events = run_stream(HermesParser.streaming(lambda: "call_x"), [hermes_call("f", {"a": 1})])
    assert [event.to_openai() for event in events] == [
        {"index": 0, "id": "call_x", "type": "function", "function": {"name": "f", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"a":1}'}},
    ]


def test_call_ids_look_like_openai_ones_and_differ():
    ids = {new_call_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(i.startswith("call_") and len(i) == 29 and i[5:].isalnum() and i.isascii() for i in ids)


# ---- llama3_json ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        '{"name": "f", "parameters": {"a": 1}}',
        '<|python_tag|>{"name": "f", "parameters": {"a": 1}}',
        '  \n<|python_tag|> {"name": "f", "arguments": {"a": 1}} \n',
    ],
)
def test_llama3_single_call(text):
    assert Llama3JsonParser.parse(text) == ParsedOutput(None, [ParsedCall("f", '{"a":1}')])


@pytest.mark.parametrize("separator", [";", "; ", " ;\n"])
def test_llama3_calls_separated_by_semicolons(separator):
    text = separator.join(json.dumps({"name": n, "parameters": {"n": n}}) for n in ("a", "b;c", "d")) + separator
    assert Llama3JsonParser.parse(text).calls == [ParsedCall(n, f'{{"n":"{n}"}}') for n in ("a", "b;c", "d")]


@pytest.mark.parametrize(
    "text",
    [
        'Here you go: {"name": "f", "parameters": {}}',  # text first
        '{"name": "f", "parameters": {}} and that is it',  # text after
        '{"name": "f", "parameters": {}}; oops',
        '{"name": "f", "parameters": {}} {"name": "g", "parameters": {}}',  # no separator
        '{"name": "Ada", "age": 36}',  # JSON that is no call: no parameters
        '{"name": "f", "parameters": "a=1"}',
        '{"name": "f", "parameters": {',
        "<|python_tag|>",
        '<|python_tag|>brave_search.call(query="x")',
        "[1, 2]",
    ],
)
def test_llama3_output_that_is_not_only_calls_is_content(text):
    assert Llama3JsonParser.parse(text) == ParsedOutput(text.strip(), [])


def test_llama3_stream_sends_plain_text_at_once_and_holds_what_may_be_calls():
    streamer = Llama3JsonParser.streaming()
    assert streamer.feed(" <|py") == []
    assert streamer.feed("thon") == []
    assert streamer.feed("n is") == [ContentDelta("<|pythonn is")]
    assert streamer.feed(' {"name": "f", "parameters": {}}') == [ContentDelta(' {"name": "f", "parameters": {}}')]

    streamer = Llama3JsonParser.streaming(counting_ids())
    assert streamer.feed('{"name": "f", "parameters": {"a": "é"}}') == []
    assert streamer.finish() == [ToolCallDelta(0, "call_0", "f", ""), ToolCallDelta(0, None, None, '{"a":"é"}')]


# ---- mistral --------------------------------------------------------------------------------------------------
def test_mistral_array_of_calls():
    text = '[TOOL_CALLS] [{"name": "a", "arguments": {"x": "]"}}, {"name": "b", "arguments": {}}]'
    assert MistralParser.parse(text) == ParsedOutput(None, [ParsedCall("a", '{"x":"]"}'), ParsedCall("b", "{}")])


def test_mistral_named_calls():
    text = 'Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Zürich"}[TOOL_CALLS]get_time[ARGS]{}'
    parsed = MistralParser.parse(text)
    assert parsed == ParsedOutput(
        "Checking.", [ParsedCall("get_weather", '{"city":"Zürich"}'), ParsedCall("get_time", "{}")]
    )


@pytest.mark.parametrize(
    "after",
    [
        '[{"name": "a", "arguments": {}',
        '[{"arguments": {}}]',
        "[]",
        "[1]",
        "hello",
        "f[ARGS]",
        "f[ARGS][1]",
        'f[ARGS]{"a": }',
        "f[ARG",
        "f(x)",
        "",
    ],
)
def test_mistral_malformed_calls_stay_content(after):
    text = "Hi [TOOL_CALLS]" + after
    assert MistralParser.parse(text) == ParsedOutput(text, [])


def test_mistral_stream():
    streamer = MistralParser.streaming(counting_ids())
    assert streamer.feed("Ok [TOOL") == [ContentDelta("Ok")]
    assert streamer.feed('_CALLS][{"name": "a", "arguments": {"s": "}]"}}') == []
    assert streamer.feed("] after") == [
        ToolCallDelta(0, "call_0", "a", ""),
        ToolCallDelta(0, None, None, '{"s":"}]"}'),
        ContentDelta("  after"),
    ]  # with the space held back after "Ok"
    assert streamer.finish() == []


@pytest.mark.parametrize("parser", [HermesParser, Llama3JsonParser, MistralParser])
def test_json_nested_too_deep_to_decode_is_content_not_an_error(parser):
    for text in ("<tool_call>" + "[" * 100_000, "[TOOL_CALLS]" + "[" * 100_000 + "]" * 100_000, "[" * 100_000):
        assert parser.parse(text) == ParsedOutput(text, [])


# ---- split invariance: any cut of the text into deltas streams exactly what parse finds ---------------------
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.sampled_from('ab é世🙂"\\\n{}[];<>/'), max_size=6)
)
json_keys = st.text(st.sampled_from("abé"), max_size=3)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(json_keys, inner, max_size=3),
    max_leaves=6,
)
arguments_objects = st.dictionaries(st.text(st.sampled_from("abcé_"), max_size=4), json_values, max_size=3)
function_names = st.sampled_from(["get_weather", "f", "search_web"])
words = st.text(st.sampled_from('ab é世\n {}[];:"<>|/_'), max_size=8)


def prefixes(marker: str) -> st.SearchStrategy[str]:
    return st.integers(1, len(marker)).map(lambda n: marker[:n])


@st.composite
def hermes_outputs(draw) -> str:
    def call(name, args, newline):
        return f"<tool_call>{newline}{dumps({'name': name, 'arguments': args})}{newline}</tool_call>"

    calls = st.builds(call, function_names, arguments_objects, st.sampled_from(["", "\n"]))
    pieces = st.one_of(
        words,
        calls,
        prefixes("<tool_call>"),
        prefixes("</tool_call>"),
        st.just("<tool_call>{"),
        st.just('{"name": "f", "arguments": {}}'),
        st.just("<toolbox>"),
    )
    return "".join(draw(st.lists(pieces, max_size=6)))


@st.composite
def llama3_outputs(draw) -> str:
    key = st.sampled_from(["parameters", "arguments"])
    call = st.builds(lambda name, args, k: dumps({"name": name, k: args}), function_names, arguments_objects, key)
    if draw(st.booleans()):  # calls, perhaps damaged
        text = draw(st.sampled_from(["", "<|python_tag|>", " <|python_tag|>", "\n"]))
        text += draw(st.sampled_from([";", "; ", " ;\n"])).join(draw(st.lists(call, min_size=1, max_size=3)))
        return text + draw(st.sampled_from(["", ";", " ", "; x", "}"]))
    return "".join(draw(st.lists(st.one_of(words, call, prefixes("<|python_tag|>")), max_size=5)))


@st.composite
def mistral_outputs(draw) -> str:
    entry = st.builds(lambda name, args: {"name": name, "arguments": args}, function_names, arguments_objects)
    array = st.lists(entry, min_size=1, max_size=3).map(lambda calls: "[TOOL_CALLS]" + dumps(calls))
    named = st.builds(lambda name, args: f"[TOOL_CALLS]{name}[ARGS]{dumps(args)}", function_names, arguments_objects)
    pieces = st.one_of(words, array, named, prefixes("[TOOL_CALLS]"), prefixes("[ARGS]"), st.just("[TOOL_CALLS]f"))
    return "".join(draw(st.lists(pieces, max_size=5)))


def check_split_invariance(parser, text, cuts):
    expected = parser.parse(text)
    assert reassemble(run_stream(parser.streaming(counting_ids()), cut(text, cuts))) == expected
    assert reassemble(run_stream(parser.streaming(counting_ids()), list(text))) == expected  # a character at a time
    for call in expected.calls:
        json.loads(call.arguments)


cuts = st.lists(st.integers(0, 400), max_size=12)


@settings(max_examples=300, deadline=None)
@given(text=hermes_outputs(), cuts=cuts)
def test_property_hermes_stream_matches_parse(text, cuts):
    check_split_invariance(HermesParser, text, cuts)


@settings(max_examples=300, deadline=None)
@given(text=llama3_outputs(), cuts=cuts)
def test_property_llama3_stream_matches_parse(text, cuts):
    check_split_invariance(Llama3JsonParser, text, cuts)


@settings(max_examples=300, deadline=None)
@given(text=mistral_outputs(), cuts=cuts)
def test_property_mistral_stream_matches_parse(text, cuts):
    check_split_invariance(MistralParser, text, cuts)


@settings(max_examples=100, deadline=None)
@given(calls=st.lists(st.tuples(function_names, arguments_objects), min_size=1, max_size=3), before=words)
def test_property_hermes_reads_back_the_arguments(calls, before):
    text = before + "".join(hermes_call(name, args) for name, args in calls)
    parsed = HermesParser.parse(text)
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == calls
    assert parsed.content == (before.strip() or None)


# ---- registry -------------------------------------------------------------------------------------------------
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>'"
    " + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN_TEMPLATE_PART = (
    '{%- if tools %}\n{{- "# Tools\\n\\n<tools>" }}{%- for tool in tools %}'
    '{{- tool | tojson }}{%- endfor %}{{- "</tools>\\n\\nFor each function call, return ...'
    ' within <tool_call></tool_call> XML tags" }}'
)
LLAMA3_TEMPLATE_PART = (
    '{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}'
    '{%- if builtin_tools is defined %}{{- "<|python_tag|>" }}{%- endif %}'
)
MISTRAL_TEMPLATE_PART = '{%- if tools %}{{- "[AVAILABLE_TOOLS]" }}{%- endif %}{{- "[TOOL_CALLS]" }}'


def test_parsers_are_registered_by_name():
    assert PARSERS == {"hermes": HermesParser, "llama3_json": Llama3JsonParser, "mistral": MistralParser}


@pytest.mark.parametrize(
    "template, expected",
    [
        (QWEN_TEMPLATE_PART, "hermes"),
        (LLAMA3_TEMPLATE_PART, "llama3_json"),
        ('{{ "ipython" }}', "llama3_json"),
        (MISTRAL_TEMPLATE_PART, "mistral"),
        (SMOLLM2_TEMPLATE, None),
        (None, None),
        ("", None),
    ],
)
def test_parser_for_template(template, expected):
    assert parser_for_template(template) == expected


# ---- fallback prompt ------------------------------------------------------------------------------------------
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK_TOOL = {"type": "function", "function": {"name": "get_time"}}


def test_tool_system_prompt_lists_the_functions_and_the_call_format():
    prompt = tool_system_prompt([WEATHER_TOOL, CLOCK_TOOL])
    assert json.dumps(WEATHER_TOOL["function"]) in prompt
    assert '{"name": "get_time"}' in prompt
    assert "<tool_call>" in prompt and "</tool_call>" in prompt and '"arguments"' in prompt


def test_tool_calls_render_as_text_hermes_reads_back():
    tool_calls = [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    text = render_tool_calls_as_text(tool_calls)
    assert text == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    )
    assert HermesParser.parse(text).calls == [
        ParsedCall("get_weather", '{"city":"Zürich"}'),
        ParsedCall("get_time", "{}"),
    ]


def test_tool_call_arguments_that_are_not_json_render_as_sent():
    text = render_tool_calls_as_text([{"function": {"name": "f", "arguments": "city=Paris"}}])
    assert text == '<tool_call>\n{"name": "f", "arguments": "city=Paris"}\n</tool_call>'


def test_render_tool_result():
    assert render_tool_result("22 °C") == "<tool_response>\n22 °C\n</tool_response>"
    assert render_tool_result("22 °C", "call_1", "get_weather") == (
        '<tool_response>\n{"tool_call_id": "call_1", "name": "get_weather", "content": "22 °C"}\n</tool_response>'
    )
    assert render_tool_result("x", name="f") == '<tool_response>\n{"name": "f", "content": "x"}\n</tool_response>'


@pytest.mark.parametrize(
    "template, expected",
    [
        (SMOLLM2_TEMPLATE, False),
        (QWEN_TEMPLATE_PART, True),
        (LLAMA3_TEMPLATE_PART, True),
        (None, False),
        ("{{ builtin_tools }}", False),
    ],
)
def test_template_supports_tools(template, expected):
    assert template_supports_tools(template) == expected


# ---- tool_choice "required" -----------------------------------------------------------------------------------
def test_parse_required_keeps_the_arguments_text_as_written():
    text = '[ {"name": "a", "arguments": {"s": "x\\"}]", "n": [1, {"c": null}]} },\n {"name":"b","arguments":{}}]'
    assert parse_required(text) == [ParsedCall("a", '{"s": "x\\"}]", "n": [1, {"c": null}]}'), ParsedCall("b", "{}")]


def test_parse_required_odd_shapes():
    text = (
        '[{"arguments": {"x": 1}, "name": "late"}, {"extra": {"name": "no"}, "name": "c"}, {"x": 1},'
        ' {"name": "s", "arguments": 5}]'
    )
    assert parse_required(text) == [ParsedCall("late", '{"x": 1}'), ParsedCall("c", "{}"), ParsedCall("s", "5")]


def test_required_stream_announces_a_call_once_its_name_is_complete_then_streams_arguments():
    streamer = RequiredCallsStreamer(counting_ids())
    assert streamer.feed('[{"name": "get_wea') == []
    assert streamer.feed('ther", "arguments": ') == [ToolCallDelta(0, "call_0", "get_weather", "")]
    assert streamer.feed('{"city": "Pa') == [ToolCallDelta(0, None, None, '{"city": "Pa')]
    assert streamer.feed('ris"} ') == [ToolCallDelta(0, None, None, 'ris"}')]
    assert streamer.feed('}, {"arguments": {"q": "🙂"}, ') == []
    assert streamer.feed('"name": "search"}]') == [
        ToolCallDelta(1, "call_1", "search", ""),
        ToolCallDelta(1, None, None, '{"q": "🙂"}'),
    ]
    assert streamer.finish() == []


@st.composite
def required_outputs(draw):
    """A schema-conforming array with whitespace drawn between tokens, and what it encodes."""
    rnd = draw(st.randoms(use_true_random=False))
    space = lambda: rnd.choice(["", "", " ", "\n  ", "\t"])  # noqa: E731

    def render(value) -> str:
        if isinstance(value, dict):
            items = [f"{space()}{dumps(k)}{space()}:{space()}{render(v)}{space()}" for k, v in value.items()]
            return "{" + (",".join(items) or space()) + "}"
        if isinstance(value, list):
            return "[" + (",".join(f"{space()}{render(v)}{space()}" for v in value) or space()) + "]"
        return json.dumps(value, ensure_ascii=rnd.random() < 0.5)

    calls = draw(st.lists(st.tuples(function_names, arguments_objects, st.booleans()), min_size=1, max_size=3))
    objects = [
        {"arguments": args, "name": name} if args_first else {"name": name, "arguments": args}
        for name, args, args_first in calls
    ]
    return space() + render(objects) + space(), [(name, args) for name, args, _ in calls]


@settings(max_examples=300, deadline=None)
@given(output=required_outputs(), cuts=cuts)
def test_property_required_stream_matches_parse_required(output, cuts):
    text, calls = output
    parsed = parse_required(text)
    assert [(c.name, json.loads(c.arguments)) for c in parsed] == calls
    for deltas in (cut(text, cuts), list(text)):
        assert reassemble(run_stream(RequiredCallsStreamer(counting_ids()), deltas)).calls == parsed
    # Cut short by max_tokens: whatever arrived still streams exactly what parse_required finds.
    prefix = text[: min(cuts, default=len(text) // 2)]
    streamed = reassemble(run_stream(RequiredCallsStreamer(counting_ids()), cut(prefix, cuts)))
    assert streamed.calls == parse_required(prefix)
