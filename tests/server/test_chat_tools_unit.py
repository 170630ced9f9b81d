"""Tools in the prompt and the tool plan, without a model: a template that knows tools gets them (and the
history's calls, arguments as objects) through `tools=`; one that does not gets them as text; the parser comes
from --tool-call-parser, else from the template's markers."""

from __future__ import annotations

import pytest

from server.chat_tools import plan_tools
from server.errors import APIError
from server.prompts import render_chat
from server.protocol import ChatCompletionRequest

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
]


class RecordingTokenizer:
    def __init__(self, chat_template: str):
        self.chat_template = chat_template
        self.calls = []

    def apply_chat_template(self, conversation, **kwargs):
        self.calls.append((conversation, kwargs))
        return [1, 2, 3]


def _request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": HISTORY, **fields})


def test_a_template_with_tools_gets_them_and_the_calls_as_objects():
    tokenizer = RecordingTokenizer("{% for tool in tools %}{{ tool }}{% endfor %}<tool_call>")
    render_chat(tokenizer, _request().messages, [WEATHER])
    conversation, kwargs = tokenizer.calls[0]
    assert kwargs["tools"] == [WEATHER]
    assert conversation[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert conversation[2] == {"role": "tool", "content": "Sunny", "tool_call_id": "call_1"}


def test_a_template_without_tools_gets_them_as_text():
    tokenizer = RecordingTokenizer("{% for m in messages %}{{ m.content }}{% endfor %}")
    render_chat(tokenizer, _request().messages, [WEATHER])
    conversation, kwargs = tokenizer.calls[0]
    assert "tools" not in kwargs
    assert conversation[0]["role"] == "system" and "get_weather" in conversation[0]["content"]
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        in conversation[2]["content"]
    )
    assert conversation[3]["content"].startswith("<tool_response>") and "Sunny" in conversation[3]["content"]


@pytest.mark.parametrize(
    "template, flag, parser",
    [
        ("{{ tools }} <tool_call>", None, "hermes"),
        ("{{ tools }} <|python_tag|>", None, "llama3_json"),
        ("{{ tools }} [TOOL_CALLS]", None, "mistral"),
        ("{{ tools }} <tool_call>", "mistral", "mistral"),
        ("{{ messages }}", None, "hermes"),  # no tool support: the fallback text asks for Hermes blocks
    ],
)
def test_the_auto_parser(template, flag, parser):
    assert plan_tools(_request(tools=[WEATHER]), template, flag).parser == parser


def test_a_tool_template_of_unknown_format_needs_the_flag():
    with pytest.raises(APIError, match="--tool-call-parser"):
        plan_tools(_request(tools=[WEATHER]), "{{ tools }} <custom_call>", None)


def test_required_schema_lists_every_tool_and_parallel_bounds_it():
    time = {"type": "function", "function": {"name": "get_time"}}
    plan = plan_tools(_request(tools=[WEATHER, time], tool_choice="required", parallel_tool_calls=False), None, None)
    assert plan.mode == "required" and '"maxItems": 1' in plan.structured.value
    assert '"const": "get_weather"' in plan.structured.value and '"const": "get_time"' in plan.structured.value
