"""Prompts to token ids: chat messages through the tokenizer's chat template, completions prompts as given."""

from __future__ import annotations

from collections.abc import Mapping

from server.errors import bad_request
from server.protocol import ChatMessage

# Most chat templates know only system/user/assistant/tool; OpenAI's "developer" is the new "system".
_TEMPLATE_ROLE = {"developer": "system"}


def render_chat(tokenizer, messages: list[ChatMessage]) -> list[int]:
    conversation = []
    for i, message in enumerate(messages):
        try:
            content = message.text()
        except ValueError as exc:
            raise bad_request(f"messages[{i}].content: {exc}.", param=f"messages.{i}.content") from None
        entry = {"role": _TEMPLATE_ROLE.get(message.role, message.role), "content": content}
        if message.name is not None:
            entry["name"] = message.name
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        conversation.append(entry)
    if getattr(tokenizer, "chat_template", None) is None:
        raise bad_request("This model has no chat template; use /v1/completions instead.", param="messages")
    try:
        rendered = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # jinja2 errors raised by the template itself ("roles must alternate", ...)
        raise bad_request(f"The chat template rejected the messages: {exc}", param="messages") from None
    # transformers 5 returns a BatchEncoding (a Mapping) where 4.x returned a list of ids.
    if isinstance(rendered, Mapping) or hasattr(rendered, "input_ids"):
        rendered = rendered["input_ids"]
    token_ids = list(rendered)
    if token_ids and isinstance(token_ids[0], list):
        token_ids = token_ids[0]
    return [int(t) for t in token_ids]


def tokenize_prompts(tokenizer, prompts: list[str | list[int]], vocab_size: int) -> list[list[int]]:
    return [tokenize_prompt(tokenizer, prompt, vocab_size, i) for i, prompt in enumerate(prompts)]


def tokenize_prompt(tokenizer, prompt: str | list[int], vocab_size: int, index: int) -> list[int]:
    if isinstance(prompt, str):
        token_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    else:
        token_ids = list(prompt)
        bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise bad_request(f"prompt token id {bad} is outside the vocabulary (0..{vocab_size - 1}).",
                              param="prompt")
    if not token_ids:
        raise bad_request(f"prompt {index} is empty; it must contain at least one token.", param="prompt")
    return token_ids
