"""Mistral tool calls, after a `[TOOL_CALLS]` marker, in either of Mistral's two spellings:

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": ...}]
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}

(the second from the v11 tokenizers on). A marker not followed by calls is plain text.
"""

from __future__ import annotations

import json
import re

from server.tools.calls import JSON_ERRORS, ParsedCall, call_from_object, compact_json
from server.tools.json_extent import ContainerScan
from server.tools.segments import Calls, Content, Segment, Segmenter, content_before, skip_whitespace
from server.tools.tool_parser import ToolParser

MARKER = "[TOOL_CALLS]"
ARGS = "[ARGS]"
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_NOT_CALLS = Content(len(MARKER))  # the marker is text, and so is what follows it, up to the next marker


class MistralSegmenter(Segmenter):
    def __init__(self):
        self._scan: ContainerScan | None = None  # how far the JSON after the marker at the front has been read

    def next_segment(self, text: str, final: bool) -> Segment | None:
        if not text.startswith(MARKER):
            return content_before(MARKER, text, final)
        start = skip_whitespace(text, len(MARKER))
        if start == len(text):
            segment = None
        elif text[start] == "[":
            segment = self._call_array(text, start)
        else:
            segment = self._named_call(text, start)
        if segment is None and final:
            segment = _NOT_CALLS  # calls cut off by the end of the output are text
        if segment is not None:
            self._scan = None  # the next text starts elsewhere
        return segment

    def _json_end(self, text: str, start: int) -> int | None:
        if self._scan is None or self._scan.start != start:
            self._scan = ContainerScan(start)
        return self._scan.end(text)

    def _call_array(self, text: str, start: int) -> Segment | None:
        end = self._json_end(text, start)
        if end is None:
            return None
        try:
            items = json.loads(text[start:end])
        except JSON_ERRORS:
            return _NOT_CALLS
        found = [call_from_object(item) for item in items]  # an array: the text starts with "["
        calls = [call for call in found if call is not None]
        if not calls or len(calls) != len(found):
            return _NOT_CALLS
        return Calls(end, calls)

    def _named_call(self, text: str, start: int) -> Segment | None:
        name = _NAME.match(text, start)
        if name is None:
            return _NOT_CALLS
        if not text.startswith(ARGS, name.end()):
            # The name may be still growing, or "[ARGS]" still arriving.
            return None if ARGS.startswith(text[name.end() :]) else _NOT_CALLS
        value = name.end() + len(ARGS)
        if value == len(text):
            return None
        if text[value] != "{":
            return _NOT_CALLS
        end = self._json_end(text, value)
        if end is None:
            return None
        try:
            arguments = json.loads(text[value:end])  # an object: the text starts with "{"
        except JSON_ERRORS:
            return _NOT_CALLS
        return Calls(end, [ParsedCall(name.group(), compact_json(arguments))])


class MistralParser(ToolParser):
    name = "mistral"
    segmenter = MistralSegmenter
