"""Llama 3.1/3.2/3.3 JSON tool calls: the whole output is the call(s), optionally after `<|python_tag|>`.

    <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", ...}

There is no marker that sets a call apart from content, so an output is calls only if all of it is; an output
that might be calls is held back whole until it ends.
"""

from __future__ import annotations

import json

from server.tools.calls import JSON_ERRORS, ParsedCall, call_from_object
from server.tools.segments import Calls, Content, Segment, Segmenter, skip_whitespace
from server.tools.tool_parser import ToolParser

PYTHON_TAG = "<|python_tag|>"
SEPARATOR = ";"
# Llama's own prompt asks for "parameters"; models fine-tuned on OpenAI-style data write "arguments".
ARGUMENT_KEYS = ("parameters", "arguments")

_decoder = json.JSONDecoder()


class Llama3JsonSegmenter(Segmenter):
    def __init__(self):
        self._plain = False  # the output has started in a way calls cannot: all of it is content

    def next_segment(self, text: str, final: bool) -> Segment | None:
        if self._plain:
            return Content(len(text))
        start = skip_whitespace(text, 0)
        if not (text.startswith((PYTHON_TAG, "{"), start) or PYTHON_TAG.startswith(text[start:])):
            self._plain = True
            return Content(len(text))
        if not final:
            return None
        calls = parse_calls(text)
        return Calls(len(text), calls) if calls else Content(len(text))


def parse_calls(text: str) -> list[ParsedCall]:
    """The calls `text` consists of, or [] when it is anything else."""
    body = text.strip().removeprefix(PYTHON_TAG)
    calls = []
    at = skip_whitespace(body, 0)
    while at < len(body):
        try:
            obj, at = _decoder.raw_decode(body, at)
        except JSON_ERRORS:
            return []
        # Without an arguments key, an object with a "name" is more likely an answer in JSON than a call.
        if not (isinstance(obj, dict) and any(key in obj for key in ARGUMENT_KEYS)):
            return []
        call = call_from_object(obj, ARGUMENT_KEYS)
        if call is None:
            return []
        calls.append(call)
        at = skip_whitespace(body, at)
        if body.startswith(SEPARATOR, at):
            at = skip_whitespace(body, at + len(SEPARATOR))
        elif at < len(body):
            return []
    return calls


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    segmenter = Llama3JsonSegmenter
