"""Tool calling for chat templates that know nothing of tools (SmolLM2's ChatML template drops a `tools`
argument): the tools, the calls and their results spelled out as Hermes-format text, the format that
`HermesParser` reads back from the output.
"""

from __future__ import annotations

import json
import re

from server.tools.hermes import END, START

_REFERENCES_TOOLS = re.compile(r"\btools\b")


def template_supports_tools(chat_template: str | None) -> bool:
    """Whether the template source uses the `tools` it is given (if not, they must go in through the messages)."""
    return bool(chat_template and _REFERENCES_TOOLS.search(chat_template))


def tool_system_prompt(tools: list[dict]) -> str:
    """System-message text that lists OpenAI `tools` (`{"type": "function", "function": {...}}`) and asks for
    calls as `<tool_call>` blocks."""
    functions = "\n".join(_json(_signature(tool["function"])) for tool in tools)
    return (
        "You can call these functions:\n"
        f"<tools>\n{functions}\n</tools>\n"
        "To call a function, answer with one block like this for each call, and nothing else:\n"
        f'{START}\n{{"name": "<function name>", "arguments": {{<arguments as a JSON object>}}}}\n{END}'
    )


def render_tool_calls_as_text(tool_calls: list[dict]) -> str:
    """An assistant message's OpenAI `tool_calls` as the text the model would have written for them."""
    return "\n".join(f"{START}\n{_json(_call_object(call['function']))}\n{END}" for call in tool_calls)


def render_tool_result(content: str, tool_call_id: str | None = None, name: str | None = None) -> str:
    """A tool message's content as a `<tool_response>` block. What is known of the call it answers goes with it
    (Hermes' `{"name": ..., "content": ...}`), so that the model can match results to parallel calls."""
    about = {key: value for key, value in (("tool_call_id", tool_call_id), ("name", name)) if value is not None}
    body = _json({**about, "content": content}) if about else content
    return f"<tool_response>\n{body}\n</tool_response>"


def _call_object(function: dict) -> dict:
    return {"name": function["name"], "arguments": _decoded(function["arguments"])}


def _signature(function: dict) -> dict:
    return {key: function[key] for key in ("name", "description", "parameters") if key in function}


def _decoded(arguments: str):
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments  # not JSON after all: shown as sent, rather than failing the whole conversation


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)
