"""A chat request's tools: what the prompt shows, what constrains the output, and how each choice's text becomes
content and tool calls.

tool_choice (default "auto" with tools, "none" without):
- "none": the tools are left out of the prompt; the output is content.
- "auto": the model decides; its own tool-call format is parsed (a parser named by --tool-call-parser, or
  the one the chat template's markers show; a template without tool support gets the tools as a system
  text asking for Hermes `<tool_call>` blocks, read with the Hermes parser).
- "required": the output is constrained to a JSON array of calls, each {"name": one of the tools,
  "arguments": that tool's parameters schema}; one call only when parallel_tool_calls is false.
- a named function: the output is constrained to that function's parameters schema: it is the arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.base import StructuredOutput
from server.errors import bad_request
from server.protocol import ChatCompletionRequest, NamedToolChoice, ToolCall
from server.structured import json_schema_output
from server.tools.events import ContentDelta, StreamEvent, ToolCallDelta, new_call_id
from server.tools.fallback_prompt import template_supports_tools
from server.tools.registry import PARSERS, parser_for_template
from server.tools.required_stream import RequiredCallsStreamer

ANY_OBJECT = {"type": "object"}


@dataclass
class ToolPlan:
    mode: str  # "none", "auto", "required" or "named"
    prompt_tools: list[dict] | None = None  # OpenAI tool definitions the prompt shows
    structured: StructuredOutput | None = None  # the output's constraint (required, named)
    parser: str | None = None  # auto: the name of the tool-call parser
    function: str | None = None  # named: the function's name


def plan_tools(body: ChatCompletionRequest, chat_template: str | None, parser_flag: str | None) -> ToolPlan:
    """400 for a tool_choice that names no given tool, or with no tools."""
    tools = body.tools or []
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    if not tools:
        if choice != "none":
            raise bad_request("tool_choice is only allowed when tools are given.", param="tool_choice")
        return ToolPlan("none")
    names = [tool.function.name for tool in tools]
    if len(set(names)) != len(names):
        raise bad_request("tools must have distinct function names.", param="tools")
    definitions = [tool.model_dump(exclude_none=True) for tool in tools]
    if choice == "none":
        return ToolPlan("none")
    if choice == "auto":
        parser = parser_flag or parser_for_template(chat_template)
        if parser is None:
            if template_supports_tools(chat_template):
                raise bad_request(
                    "This model's tool-call format is unknown: start the server with --tool-call-parser "
                    f"(one of {', '.join(sorted(PARSERS))}) to use tool_choice auto.",
                    param="tool_choice",
                )
            parser = "hermes"  # the format the fallback system text asks for
        return ToolPlan("auto", definitions, parser=parser)
    if choice == "required":
        schema = _calls_schema(tools, body.parallel_tool_calls)
        return ToolPlan("required", definitions, json_schema_output(schema, "tools"))
    assert isinstance(choice, NamedToolChoice)
    wanted = choice.function.name
    tool = next((tool for tool in tools if tool.function.name == wanted), None)
    if tool is None:
        raise bad_request(
            f"tool_choice names the function {wanted!r}, which is not among the tools.", param="tool_choice"
        )
    return ToolPlan(
        "named", definitions, json_schema_output(tool.function.parameters or ANY_OBJECT, "tools"), function=wanted
    )


def _calls_schema(tools, parallel: bool) -> dict:
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": tool.function.name}, "arguments": tool.function.parameters or ANY_OBJECT},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    schema = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


class _Passthrough:
    def feed(self, text: str) -> list[StreamEvent]:
        return [ContentDelta(text)] if text else []

    def finish(self) -> list[StreamEvent]:
        return []


class _NamedCall:
    """The whole output is the arguments of the one named call."""

    def __init__(self, name: str):
        self._name = name
        self._started = False

    def feed(self, text: str) -> list[StreamEvent]:
        events: list[StreamEvent] = [] if self._started else [ToolCallDelta(0, new_call_id(), self._name, "")]
        self._started = True
        return events + ([ToolCallDelta(0, None, None, text)] if text else [])

    def finish(self) -> list[StreamEvent]:
        return self.feed("") if not self._started else []


def output_reader(plan: ToolPlan):
    """A fresh reader of one choice's text: feed(text) and finish() give content and tool-call events."""
    if plan.mode == "auto":
        assert plan.parser is not None  # plan_tools sets the parser of every "auto" plan
        return PARSERS[plan.parser].streaming()
    if plan.mode == "required":
        return RequiredCallsStreamer()
    if plan.mode == "named":
        assert plan.function is not None  # plan_tools sets the function of every "named" plan
        return _NamedCall(plan.function)
    return _Passthrough()


def assemble(events: list[StreamEvent]) -> tuple[str | None, list[ToolCall]]:
    """A whole message from its events: content (None when there is none) and tool calls."""
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    calls: dict[int, dict] = {}
    for e in events:
        if isinstance(e, ToolCallDelta):
            call = calls.setdefault(e.index, {"id": e.id, "name": e.name, "arguments": ""})
            call["arguments"] += e.arguments
    tool_calls = [
        ToolCall(id=c["id"], function={"name": c["name"], "arguments": c["arguments"]})
        for _, c in sorted(calls.items())
    ]
    return (content or None) if tool_calls else content, tool_calls
