"""An output cut, front to back, into content and tool calls: the one reading both `parse` and streaming use.

A format's `Segmenter` looks at the front of the text not yet settled and says what its first segment is, or
that it cannot tell yet. It may only settle what no later text could change, so that cutting a stream into
deltas anywhere settles the same segments as reading the whole output at once. `final` says no text follows:
then everything must settle.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

from server.tools.calls import ParsedCall


@dataclass(frozen=True)
class Content:
    length: int


@dataclass(frozen=True)
class Calls:
    length: int
    calls: list[ParsedCall]


Segment = Content | Calls


class Segmenter(ABC):
    """Reads one output, in order: after answering None it is shown the same text again with more at the end;
    after a segment, the text that follows it. So it may keep what it learned about the front (to avoid
    reading a long call again for every delta) until it returns a segment."""

    @abstractmethod
    def next_segment(self, text: str, final: bool) -> Segment | None:
        """The first segment of the non-empty `text` (its length > 0), or None to wait for more text (never when
        `final`)."""


def take_segments(segmenter: Segmenter, text: str, final: bool) -> tuple[list[str | list[ParsedCall]], str]:
    """The settled front of `text`, as content texts and lists of calls in output order, and the unsettled rest."""
    settled: list[str | list[ParsedCall]] = []
    while text:
        segment = segmenter.next_segment(text, final)
        if segment is None:
            break
        settled.append(segment.calls if isinstance(segment, Calls) else text[: segment.length])
        text = text[segment.length :]
    return settled, text


_WHITESPACE = re.compile(r"\s*")  # what str.strip() strips


def skip_whitespace(text: str, at: int) -> int:
    """The index of the first character at or after `at` that is not whitespace (or the end)."""
    match = _WHITESPACE.match(text, at)
    assert match is not None  # \s* matches anywhere, if only the empty string
    return match.end()


def partial_marker_length(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is the start of `marker` (but not all of it)."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0


def content_before(marker: str, text: str, final: bool) -> Content | None:
    """The content at the front of a `text` that does not start with `marker`: all of it up to the marker,
    less an end that may yet turn into the marker (held back like a stop string's start)."""
    end = text.find(marker)
    if end == -1:
        end = len(text) if final else len(text) - partial_marker_length(text, marker)
    return Content(end) if end > 0 else None
