"""Tool calls from `tool_choice: "required"`, where a JSON schema constrains the output to an array of calls:

    [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]

A call's arguments are the exact text of its "arguments" value, not a re-serialization: that text streams out
as it is generated, and `parse_required` must agree with the stream to the character. (It is valid JSON
whenever the output is, which the schema sees to, unless max_tokens cut it short.)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from server.tools.calls import ParsedCall
from server.tools.events import StreamEvent, ToolCallDelta, new_call_id

_JSON_WHITESPACE = " \t\n\r"
_SCALAR_END = ",}]" + _JSON_WHITESPACE
_CALL_DEPTH = 2  # inside the array (1), inside a call object (2)


def parse_required(text: str) -> list[ParsedCall]:
    scanner = _CallArrayScanner()
    scanner.feed(text)
    return [ParsedCall(call.name, "".join(call.arguments)) for call in scanner.calls if call.name is not None]


class RequiredCallsStreamer:
    """Tool-call events for a stream of the array: a call's first delta as soon as its name is complete, then
    its arguments text as it arrives (all that came before the name at once, should "arguments" come first)."""

    def __init__(self, new_id: Callable[[], str] = new_call_id):
        self._scanner = _CallArrayScanner()
        self._new_id = new_id
        self._sent: list[int] = []  # per call announced: how many pieces of its arguments text have gone out

    def feed(self, text: str) -> list[StreamEvent]:
        self._scanner.feed(text)
        events: list[StreamEvent] = []
        for index, call in enumerate(self._scanner.calls):
            if call.name is None:  # only the last call can be still without a name
                break
            if index == len(self._sent):
                events.append(ToolCallDelta(index, self._new_id(), call.name, ""))
                self._sent.append(0)
            if len(call.arguments) > self._sent[index]:
                events.append(ToolCallDelta(index, None, None, "".join(call.arguments[self._sent[index] :])))
                self._sent[index] = len(call.arguments)
        return events

    def finish(self) -> list[StreamEvent]:
        """Nothing is held back: every character is sent once it is known to belong to a call's arguments."""
        return []


@dataclass
class _CallText:
    name: str | None = None
    # The arguments text, in pieces: joining them only once they are sent keeps a long value linear to copy.
    arguments: list[str] = field(default_factory=list)


class _CallArrayScanner:
    """Follows the array a character at a time, tracking strings (and their escapes) and bracket depth, to pick
    out each call object's "name" and copy the text of its "arguments" value."""

    def __init__(self):
        self.calls: list[_CallText] = []  # a call object without a name is dropped when it closes
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._token: str | None = None  # a key or a value string at call level being read, quotes included
        self._key: str | None = None  # the key at call level whose value comes next; None while a key is due
        self._awaiting_value = False  # between a call-level ":" and the value
        self._copying: str | None = None  # the kind of arguments value being copied: string, container, scalar

    def feed(self, text: str) -> None:
        for char in text:
            if self._in_string:
                self._string_char(char)
            elif self._copying == "scalar" and char not in _SCALAR_END:
                self.calls[-1].arguments.append(char)
            else:
                if self._copying == "scalar":
                    self._copying = None  # the number (or true, false, null) has ended; `char` is the object's
                self._structural_char(char)

    def _string_char(self, char: str) -> None:
        if self._copying:
            self.calls[-1].arguments.append(char)
        elif self._token is not None:
            self._token += char
        if self._escaped:
            self._escaped = False
        elif char == "\\":
            self._escaped = True
        elif char == '"':
            self._in_string = False
            if self._copying == "string":
                self._copying = None
            elif self._token is not None:
                self._end_token(self._token)

    def _structural_char(self, char: str) -> None:
        if self._copying:  # inside an arguments object or array
            self.calls[-1].arguments.append(char)
            if char == '"':
                self._in_string = True
            elif char in "[{":
                self._depth += 1
            elif char in "]}":
                self._depth -= 1
                if self._depth == _CALL_DEPTH:
                    self._copying = None
        elif self._depth == _CALL_DEPTH and self._awaiting_value and char not in _JSON_WHITESPACE:
            self._start_value(char)
        elif char == '"':
            self._in_string = True
            if self._depth == _CALL_DEPTH:
                self._token = char
        elif char in "[{":
            self._depth += 1
            if self._depth == _CALL_DEPTH:
                self.calls.append(_CallText())
                self._key = None
        elif char in "]}":
            if self._depth == _CALL_DEPTH:
                self._end_call()
            self._depth -= 1
        elif self._depth == _CALL_DEPTH:
            if char == ":":
                self._awaiting_value = True
            elif char == ",":
                self._key = None

    def _start_value(self, char: str) -> None:
        self._awaiting_value = False
        copying = self._key == "arguments" and not self.calls[-1].arguments
        if copying:
            self.calls[-1].arguments.append(char)
            self._copying = "string" if char == '"' else "container" if char in "[{" else "scalar"
        if char == '"':
            self._in_string = True
            if not copying:
                self._token = char
        elif char in "[{":
            self._depth += 1

    def _end_token(self, token: str) -> None:
        try:
            text = json.loads(token)
        except ValueError:
            text = None
        self._token = None
        if self._key is None:
            self._key = text
        elif self._key == "name" and self.calls[-1].name is None:
            self.calls[-1].name = text

    def _end_call(self) -> None:
        call = self.calls[-1]
        if call.name is None:
            self.calls.pop()
        elif not call.arguments:
            call.arguments.append("{}")  # a function without parameters, written without "arguments"
