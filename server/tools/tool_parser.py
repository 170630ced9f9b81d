"""A model family's tool-call format, read from a whole output (`parse`) or a delta at a time (`streaming`).

Both read through the format's `Segmenter`, so a stream adds up to exactly what `parse` finds in the same text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from server.tools.calls import ParsedCall, ParsedOutput
from server.tools.events import ContentDelta, StreamEvent, ToolCallDelta, new_call_id
from server.tools.segments import Segmenter, take_segments


class ToolParser:
    name: ClassVar[str]
    segmenter: ClassVar[type[Segmenter]]

    @classmethod
    def parse(cls, text: str) -> ParsedOutput:
        settled, _ = take_segments(cls.segmenter(), text, final=True)
        content = "".join(segment for segment in settled if isinstance(segment, str)).strip()
        calls = [call for segment in settled if not isinstance(segment, str) for call in segment]
        return ParsedOutput(content or None, calls)

    @classmethod
    def streaming(cls, new_id: Callable[[], str] = new_call_id) -> StreamingToolParser:
        """A reader for one choice's stream; `new_id` names each call (injectable so tests know the ids)."""
        return StreamingToolParser(cls.segmenter(), new_id)


class StreamingToolParser:
    """Turns text deltas into content and tool-call events. Text that might still become part of a call is held
    back until it is settled, so nothing sent ever needs taking back; a call goes out whole once it is complete."""

    def __init__(self, segmenter: Segmenter, new_id: Callable[[], str] = new_call_id):
        self._segmenter = segmenter
        self._new_id = new_id
        self._unsettled = ""
        self._content = _StrippedContent()
        self._calls_sent = 0

    def feed(self, text: str) -> list[StreamEvent]:
        return self._settle(self._unsettled + text, final=False)

    def finish(self) -> list[StreamEvent]:
        """The events of what was held back, now that the output has ended."""
        return self._settle(self._unsettled, final=True)

    def _settle(self, text: str, final: bool) -> list[StreamEvent]:
        settled, self._unsettled = take_segments(self._segmenter, text, final)
        events: list[StreamEvent] = []
        for segment in settled:
            if isinstance(segment, str):
                if content := self._content.feed(segment):
                    events.append(ContentDelta(content))
            else:
                for call in segment:
                    events += self._call_events(call)
        return events

    def _call_events(self, call: ParsedCall) -> list[ToolCallDelta]:
        index, self._calls_sent = self._calls_sent, self._calls_sent + 1
        return [ToolCallDelta(index, self._new_id(), call.name, ""), ToolCallDelta(index, None, None, call.arguments)]


class _StrippedContent:
    """Passes content on so that it adds up to the stripped whole, as `parse` reports it: leading whitespace is
    dropped, and whitespace waits until something else follows it (if nothing does, it was trailing)."""

    def __init__(self):
        self._started = False
        self._held = ""

    def feed(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        text = self._held + text
        kept = text.rstrip()
        self._held = text[len(kept) :]
        return kept
