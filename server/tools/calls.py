"""Tool calls read from a finished output, in OpenAI's shape: the arguments are a JSON string."""

from __future__ import annotations

import json
from dataclasses import dataclass

# What decoding model-written JSON can raise: invalid text, or nesting deeper than the decoder's recursion allows.
JSON_ERRORS = (ValueError, RecursionError)


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends `function.arguments`


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None  # the text outside the calls, stripped; None when there is none
    calls: list[ParsedCall]


def compact_json(value) -> str:
    """The arguments as OpenAI writes them: no spaces, non-ASCII characters as themselves."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def call_from_object(obj, argument_keys: tuple[str, ...] = ("arguments",)) -> ParsedCall | None:
    """The call a decoded `{"name": ..., "arguments": {...}}` object stands for, or None when it is not one.

    The arguments are the first of `argument_keys` present (models differ in the key they use), `{}` when none
    is: a call of a function without parameters is still a call."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    arguments: object = next((obj[key] for key in argument_keys if key in obj), {})
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None
    return ParsedCall(name, compact_json(arguments))


def call_from_json(text: str) -> ParsedCall | None:
    """`call_from_object` for JSON text; None also when the text is not JSON."""
    try:
        obj = json.loads(text)
    except JSON_ERRORS:
        return None
    return call_from_object(obj)
