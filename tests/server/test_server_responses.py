"""POST /v1/responses on the live server with the default model, through the official openai SDK: plain and
structured text, instructions and message items, a function-call round trip over previous_response_id, the
SDK's stream helper (event order, deltas that rebuild the final response, equal to the non-streamed one), and
the 400s and 404s. The model is tiny, so tool calls and streams that must complete are constrained."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from .conftest import assert_error, sse_events

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
    "strict": True,
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
YES_NO = {
    "type": "json_schema",
    "name": "answer",
    "strict": True,
    "schema": {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,
    },
}


def test_string_input(openai_client, model_name):
    response = openai_client.responses.create(model=model_name, input="Say hello.", max_output_tokens=16, temperature=0)
    assert re.fullmatch(r"resp_[0-9a-f]{32}", response.id)
    assert response.object == "response" and response.model == model_name
    assert response.output_text.strip()
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    usage = response.usage
    assert usage.input_tokens > 0 and 0 < usage.output_tokens <= 16
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0
    if response.status == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens" and usage.output_tokens == 16
    else:
        assert response.status == "completed" and response.incomplete_details is None


def test_instructions_and_message_items(openai_client, model_name):
    items = [
        {"role": "user", "content": "My name is Ada."},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello Ada!"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "What is my name?"}]},
    ]
    instructed = openai_client.responses.create(
        model=model_name,
        input=items,
        max_output_tokens=8,
        temperature=0,
        instructions="Answer in one word.",
        metadata={"test": "yes"},
    )
    system = openai_client.responses.create(
        model=model_name,
        max_output_tokens=8,
        temperature=0,
        input=[{"role": "system", "content": "Answer in one word."}, *items],
    )
    assert instructed.output_text
    assert instructed.instructions == "Answer in one word." and instructed.metadata == {"test": "yes"}
    # the instructions are the first system message: the same prompt, the same output
    assert instructed.usage.input_tokens == system.usage.input_tokens
    assert instructed.output_text == system.output_text


def test_json_schema_format(openai_client, model_name):
    text = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}
    response = openai_client.responses.create(
        model=model_name, input="Invent a person.", text=text, max_output_tokens=64, temperature=0
    )
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), PERSON)
    assert response.text.format.type == "json_schema" and response.text.format.schema_ == PERSON


def test_function_call_round_trip(openai_client, model_name):
    first = openai_client.responses.create(
        model=model_name,
        input="What is the weather like in Paris?",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=64,
        temperature=0,
    )
    assert first.status == "completed"
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", call.call_id) and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    assert first.tools[0].name == "get_weather" and first.tool_choice.name == "get_weather"

    second = openai_client.responses.create(
        model=model_name,
        previous_response_id=first.id,
        tools=[WEATHER],
        max_output_tokens=24,
        temperature=0,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature_c": 21}'}],
    )
    assert second.previous_response_id == first.id
    assert [item.type for item in second.output] == ["message"]
    # the whole conversation went into the prompt: the first input, its call and the call's output
    assert second.usage.input_tokens > first.usage.input_tokens


def test_unknown_or_unstored_previous_response_is_404(openai_client, http, model_name):
    unstored = openai_client.responses.create(model=model_name, input="Hi", max_output_tokens=2, store=False)
    for response_id in ("resp_0123456789abcdef", unstored.id):
        error = assert_error(
            http.post("/v1/responses", json={"model": model_name, "input": "Hi", "previous_response_id": response_id}),
            404,
        )
        assert error["type"] == "invalid_request_error" and error["param"] == "previous_response_id"
        assert response_id in error["message"]


def _stream(openai_client, **kwargs):
    with openai_client.responses.stream(**kwargs) as stream:
        events = list(stream)
        return events, stream.get_final_response()


def test_stream_text(openai_client, model_name):
    kwargs = {
        "model": model_name,
        "input": "Is water wet?",
        "text": {"format": YES_NO},
        "max_output_tokens": 32,
        "temperature": 0,
    }
    events, final = _stream(openai_client, **kwargs)
    kinds = [event.type for event in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas > 0
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == final.output_text == events[-4].text
    jsonschema.validate(json.loads(text), YES_NO["schema"])
    created = events[0].response
    assert created.status == "in_progress" and created.output == [] and created.id == final.id
    plain = openai_client.responses.create(**kwargs)
    assert final.output_text == plain.output_text and final.usage.output_tokens == plain.usage.output_tokens
    assert final.usage.input_tokens == plain.usage.input_tokens and final.status == plain.status == "completed"


def test_stream_function_call(openai_client, model_name):
    events, final = _stream(
        openai_client,
        model=model_name,
        input="Weather in Rome?",
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=64,
        temperature=0,
    )
    kinds = [event.type for event in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert set(kinds[3:-3]) == {"response.function_call_arguments.delta"}
    [call] = final.output
    assert call.type == "function_call" and call.name == "get_weather"
    arguments = "".join(event.delta for event in events if event.type == "response.function_call_arguments.delta")
    assert arguments == call.arguments == events[-3].arguments
    jsonschema.validate(json.loads(arguments), WEATHER["parameters"])


def test_stream_cut_short_is_incomplete(http, model_name):
    with http.stream(
        "POST",
        "/v1/responses",
        json={"model": model_name, "input": "Count to fifty.", "max_output_tokens": 3, "stream": True},
    ) as response:
        assert response.status_code == 200
        lines = list(response.iter_lines())
    names = [line[len("event: ") :] for line in lines if line.startswith("event: ")]
    payloads = sse_events(iter(lines))
    assert names == [payload["type"] for payload in payloads]
    assert names[-1] == "response.incomplete" and "[DONE]" not in payloads
    last = payloads[-1]["response"]
    assert last["incomplete_details"] == {"reason": "max_output_tokens"} and last["usage"]["output_tokens"] == 3
    assert last["output"][0]["status"] == "incomplete"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"background": True}, "background"),
        ({"truncation": "auto"}, "truncation"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"tool_choice": {"type": "web_search"}}, "tool_choice"),
        ({"text": {"format": {"type": "text"}, "verbosity": "low"}}, "text.verbosity"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
            "input.0.message.content.0.type",
        ),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input.0"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"tools": [WEATHER], "tool_choice": "required", "text": {"format": {"type": "json_object"}}}, "tool_choice"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"input": []}, "input"),
    ],
)
def test_unsupported_fields_are_400(http, model_name, extra, param):
    body = {"model": model_name, "input": "Hi", **extra}
    error = assert_error(http.post("/v1/responses", json=body), 400)
    assert error["param"] == param, error
