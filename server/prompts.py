"""Prompts to token ids: chat messages through the tokenizer's chat template, completions prompts as given.

Tools, assistant tool calls and tool results go through the template when it knows tools (Hugging Face's
conventions: `tools=` and `tool_calls` with arguments as objects); a template that ignores tools gets them
spelled out as text instead (server/tools/fallback_prompt.py), so the model still sees the whole exchange.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from server.errors import bad_request
from server.protocol import ChatMessage
from server.tools.fallback_prompt import (
    render_tool_calls_as_text,
    render_tool_result,
    template_supports_tools,
    tool_system_prompt,
)

# Most chat templates know only system/user/assistant/tool; OpenAI's "developer" is the new "system".
_TEMPLATE_ROLE = {"developer": "system"}


def render_chat(tokenizer, messages: list[ChatMessage], tools: list[dict] | None = None) -> list[int]:
    """`tools`: OpenAI tool definitions the model may call (None: none)."""
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        raise bad_request("This model has no chat template; use /v1/completions instead.", param="messages")
    native = template_supports_tools(template)
    conversation = [_entry(message, i, native) for i, message in enumerate(messages)]
    kwargs = {}
    if tools and native:
        kwargs["tools"] = tools
    elif tools:
        conversation = _with_system_text(conversation, tool_system_prompt(tools))
    try:
        rendered = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, **kwargs)
    except Exception as exc:  # jinja2 errors raised by the template itself ("roles must alternate", ...)
        raise bad_request(f"The chat template rejected the messages: {exc}", param="messages") from None
    # transformers 5 returns a BatchEncoding (a Mapping) where 4.x returned a list of ids.
    if isinstance(rendered, Mapping) or hasattr(rendered, "input_ids"):
        rendered = rendered["input_ids"]
    token_ids = list(rendered)
    if token_ids and isinstance(token_ids[0], list):
        token_ids = token_ids[0]
    return [int(t) for t in token_ids]


def _entry(message: ChatMessage, i: int, native_tools: bool) -> dict:
    try:
        content = message.text()
    except ValueError as exc:
        raise bad_request(f"messages[{i}].content: {exc}.", param=f"messages.{i}.content") from None
    entry: dict[str, Any] = {"role": _TEMPLATE_ROLE.get(message.role, message.role), "content": content}
    if message.name is not None:
        entry["name"] = message.name
    calls = [call.model_dump() for call in message.tool_calls or ()]
    if native_tools:
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        if calls:
            entry["tool_calls"] = [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])},
                }
                for c in calls
            ]
    elif calls:
        entry["content"] = "\n".join(filter(None, [content, render_tool_calls_as_text(calls)]))
    elif message.role == "tool":
        entry["content"] = render_tool_result(content, message.tool_call_id, message.name)
    return entry


def _arguments(text: str):
    """Templates index into arguments (Hugging Face's convention is an object), OpenAI sends JSON text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _with_system_text(conversation: list[dict], text: str) -> list[dict]:
    if conversation and conversation[0]["role"] == "system":
        first = conversation[0] | {"content": f"{conversation[0]['content']}\n\n{text}"}
        return [first, *conversation[1:]]
    return [{"role": "system", "content": text}, *conversation]


def tokenize_prompts(tokenizer, prompts: list[str | list[int]], vocab_size: int) -> list[list[int]]:
    return [tokenize_prompt(tokenizer, prompt, vocab_size, i) for i, prompt in enumerate(prompts)]


def tokenize_prompt(tokenizer, prompt: str | list[int], vocab_size: int, index: int) -> list[int]:
    if isinstance(prompt, str):
        token_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    else:
        token_ids = list(prompt)
        bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise bad_request(f"prompt token id {bad} is outside the vocabulary (0..{vocab_size - 1}).", param="prompt")
    if not token_ids:
        raise bad_request(f"prompt {index} is empty; it must contain at least one token.", param="prompt")
    return token_ids
