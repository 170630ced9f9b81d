"""Structured outputs and tool calling on the live server with the default model, through the official openai
SDK: pydantic parsing, json_object, vLLM's structured_outputs / guided_* on both endpoints, named, required
and auto tool choices, parallel calls, a whole tool round trip, and streamed tool calls that reassemble to
the non-streamed ones. What the grammar promises is checked with jsonschema, not by eye."""

from __future__ import annotations

import json
import re
from enum import Enum

import jsonschema
import pytest
from pydantic import BaseModel, Field

from .conftest import assert_error

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 30}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, TIME)}
# The Hermes text the fallback prompt asks the default model for; a regex forces it where the test needs a
# model-format call from a model too small to write one reliably.
HERMES_CALL = (
    r'<tool_call>\n\{"name": "get_weather", '
    r'"arguments": \{"city": "[A-Za-z]{1,12}", "unit": "celsius"\}\}\n</tool_call>'
)


class Role(str, Enum):
    admin = "admin"
    editor = "editor"
    viewer = "viewer"


class Address(BaseModel):
    city: str = Field(max_length=30)
    postcode: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(max_length=30)
    age: int = Field(ge=0, le=120)
    role: Role
    address: Address
    languages: list[str] = Field(max_length=3)
    nickname: str | None


def _valid_call(call) -> dict:
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, PARAMETERS[call.function.name])
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", call.id)
    assert call.type == "function"
    return arguments


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_parse_with_a_pydantic_model(openai_client, model_name, temperature):
    completion = openai_client.chat.completions.parse(
        model=model_name,
        temperature=temperature,
        seed=1,
        max_tokens=200,
        response_format=Person,
        messages=[{"role": "user", "content": "Make up a person who uses our web site."}],
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    person = choice.message.parsed
    assert isinstance(person, Person) and isinstance(person.role, Role) and len(person.address.postcode) == 5


def test_json_object(openai_client, model_name):
    completion = openai_client.chat.completions.create(
        model=model_name,
        temperature=0,
        max_tokens=150,
        response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Reply with a JSON object with two keys, name and color, for a cat."}],
    )
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(completion.choices[0].message.content), dict)


def test_vllm_fields_constrain_completions(openai_client, model_name):
    choice = openai_client.completions.create(
        model=model_name, prompt="Is the sky blue? Answer:", max_tokens=5, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert choice.choices[0].text in ("yes", "no")
    regex = openai_client.completions.create(
        model=model_name,
        prompt="A date:",
        max_tokens=20,
        temperature=1.0,
        extra_body={"structured_outputs": {"regex": r"20[0-9]{2}-[01][0-9]"}},
    )
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]", regex.choices[0].text)
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["n"],
        "additionalProperties": False,
    }
    guided = openai_client.completions.create(
        model=model_name, prompt="A number as JSON:", max_tokens=20, extra_body={"guided_json": schema}
    )
    jsonschema.validate(json.loads(guided.choices[0].text), schema)


def test_a_grammar(openai_client, model_name):
    grammar = 'root ::= "The answer is " ("yes" | "no") "."'
    completion = openai_client.chat.completions.create(
        model=model_name,
        max_tokens=20,
        temperature=1.0,
        messages=ASK_WEATHER,
        extra_body={"structured_outputs": {"grammar": grammar}},
    )
    assert completion.choices[0].message.content in ("The answer is yes.", "The answer is no.")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_named_tool_gets_arguments_that_follow_its_schema(openai_client, model_name, temperature):
    completion = openai_client.chat.completions.create(
        model=model_name,
        messages=ASK_WEATHER,
        tools=[WEATHER, TIME],
        temperature=temperature,
        max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    _valid_call(call)


def test_required_calls_one_of_the_tools(openai_client, model_name):
    completion = openai_client.chat.completions.create(
        model=model_name,
        messages=ASK_WEATHER,
        tools=[WEATHER, TIME],
        tool_choice="required",
        temperature=0,
        max_tokens=120,
        parallel_tool_calls=False,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    _valid_call(call)


def test_required_with_parallel_calls_may_call_several(openai_client, model_name):
    completions = openai_client.chat.completions.create(
        model=model_name,
        messages=ASK_WEATHER,
        tools=[WEATHER, TIME],
        tool_choice="required",
        temperature=1.0,
        seed=5,
        n=4,
        max_tokens=200,
    )
    for choice in completions.choices:
        calls = choice.message.tool_calls
        assert len({call.id for call in calls}) == len(calls) >= 1
        # a small model may list calls until max_tokens cuts the last one short; every complete call is valid
        complete = calls if choice.finish_reason == "tool_calls" else calls[:-1]
        assert choice.finish_reason in ("tool_calls", "length")
        for call in complete:
            _valid_call(call)
    assert max(len(choice.message.tool_calls) for choice in completions.choices) >= 2


def test_auto_reads_the_models_own_tool_call_format(openai_client, model_name):
    completion = openai_client.chat.completions.create(
        model=model_name,
        messages=ASK_WEATHER,
        tools=[WEATHER, TIME],
        temperature=0,
        max_tokens=60,
        extra_body={"guided_regex": HERMES_CALL},
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert _valid_call(call)["unit"] == "celsius"


def test_auto_parallel_calls(openai_client, model_name):
    two = (
        HERMES_CALL
        + r"\n"
        + HERMES_CALL.replace("get_weather", "get_time").replace(
            r'"city": "[A-Za-z]{1,12}", "unit": "celsius"', r'"zone": "[A-Za-z]{1,12}"'
        )
    )
    completion = openai_client.chat.completions.create(
        model=model_name,
        messages=ASK_WEATHER,
        tools=[WEATHER, TIME],
        temperature=0,
        max_tokens=100,
        extra_body={"guided_regex": two},
    )
    calls = completion.choices[0].message.tool_calls
    assert [call.function.name for call in calls] == ["get_weather", "get_time"]
    for call in calls:
        _valid_call(call)


def test_auto_without_a_call_is_plain_content(openai_client, model_name):
    completion = openai_client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "Say hello."}],
        tools=[WEATHER],
        temperature=0,
        max_tokens=20,
        extra_body={"guided_regex": "Hello[a-z !]{0,10}"},
    )
    choice = completion.choices[0]
    assert choice.message.tool_calls in (None, [])
    assert choice.message.content.startswith("Hello")
    assert choice.finish_reason in ("stop", "length")


def test_tool_choice_none_is_plain_text(openai_client, model_name):
    completion = openai_client.chat.completions.create(
        model=model_name, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=20
    )
    assert completion.choices[0].message.content
    assert not completion.choices[0].message.tool_calls


def test_a_whole_tool_round_trip(openai_client, model_name):
    first = openai_client.chat.completions.create(
        model=model_name,
        messages=ASK_WEATHER,
        tools=[WEATHER],
        temperature=0,
        max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    message = first.choices[0].message
    [call] = message.tool_calls
    history = ASK_WEATHER + [
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 degrees celsius."},
    ]
    answer = openai_client.chat.completions.create(
        model=model_name, messages=history, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=40
    )
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.choices[0].message.content
    # the history is in the prompt: the tool result adds its tokens
    without = openai_client.chat.completions.create(model=model_name, messages=ASK_WEATHER, max_tokens=1)
    assert answer.usage.prompt_tokens > without.usage.prompt_tokens + 20


@pytest.mark.parametrize("kind", ["named", "required", "auto"])
def test_streamed_tool_calls_reassemble_to_the_non_streamed_ones(openai_client, model_name, kind):
    extra = {
        "named": dict(tool_choice={"type": "function", "function": {"name": "get_weather"}}),
        "required": dict(tool_choice="required", parallel_tool_calls=False),
        "auto": dict(extra_body={"guided_regex": HERMES_CALL}),
    }[kind]
    params = dict(model=model_name, messages=ASK_WEATHER, tools=[WEATHER, TIME], temperature=0, max_tokens=120, **extra)
    whole = openai_client.chat.completions.create(**params).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in openai_client.chat.completions.create(stream=True, **params):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or ():
                if delta.id is not None:  # a call's first delta: id, type and name, then argument fragments
                    assert delta.index not in calls and delta.type == "function"
                    calls[delta.index] = {"name": delta.function.name, "arguments": delta.function.arguments or ""}
                else:
                    assert delta.function.name is None
                    calls[delta.index]["arguments"] += delta.function.arguments
    assert finish == whole.finish_reason == "tool_calls"
    assert [calls[i] for i in sorted(calls)] == [
        {"name": c.function.name, "arguments": c.function.arguments} for c in whole.message.tool_calls
    ]


def test_structured_output_refusals_name_the_problem(http, model_name):
    base = {"model": model_name, "messages": ASK_WEATHER, "max_tokens": 5}
    unique = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}
    assert_error(
        http.post("/v1/chat/completions", json=base | {"response_format": unique}), 400, contains="uniqueItems"
    )
    assert_error(
        http.post("/v1/chat/completions", json=base | {"guided_decoding_backend": "outlines"}),
        400,
        contains="guided_decoding_backend",
    )
    both = base | {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}
    assert_error(http.post("/v1/chat/completions", json=both), 400, contains="cannot be combined")
    # metadata fields are accepted and change nothing
    ok = http.post("/v1/chat/completions", json=base | {"user": "u1", "metadata": {"k": "v"}, "store": False})
    assert ok.status_code == 200, ok.text
