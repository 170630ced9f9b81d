"""Hermes-style tool calls (Hermes 2/3, Qwen 2.5, Qwen3): one JSON object per `<tool_call>` block.

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Several blocks in a row are parallel calls. A block whose body is not such an object is plain text.
"""

from __future__ import annotations

from server.tools.calls import call_from_json
from server.tools.segments import Calls, Content, Segment, Segmenter, content_before, partial_marker_length
from server.tools.tool_parser import ToolParser

START = "<tool_call>"
END = "</tool_call>"


class HermesSegmenter(Segmenter):
    def __init__(self):
        self._searched = 0  # where to resume the search for the closing tag of the call at the front

    def next_segment(self, text: str, final: bool) -> Segment | None:
        if not text.startswith(START):
            return content_before(START, text, final)
        end = text.find(END, max(len(START), self._searched))
        self._searched = 0 if end != -1 or final else len(text) - len(END) + 1
        if end != -1:
            body, length = text[len(START) : end], end + len(END)
        elif final:
            # Generation stopped before the closing tag (a stop token, max_tokens): a complete call still counts,
            # as does one cut off inside the closing tag.
            body, length = text[len(START) :], len(text)
            body = body[: len(body) - partial_marker_length(body, END)]
        else:
            return None
        call = call_from_json(body)
        # Not a call: the tag is text, and so is what follows it, up to the next tag.
        return Content(len(START)) if call is None else Calls(length, [call])


class HermesParser(ToolParser):
    name = "hermes"
    segmenter = HermesSegmenter
