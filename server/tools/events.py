"""What a tool-call-aware stream sends: content fragments and OpenAI `delta.tool_calls` entries."""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

_ID_ALPHABET = string.ascii_letters + string.digits
_random = random.SystemRandom()  # ids of concurrent requests must not collide, whatever seeds `random`


def new_call_id() -> str:
    """An id in OpenAI's style: "call_" and 24 letters or digits."""
    return "call_" + "".join(_random.choices(_ID_ALPHABET, k=24))


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """One entry of a chunk's `delta.tool_calls`. A call's first delta has its id and name and empty arguments;
    the later ones have neither, only the next fragment of the arguments."""

    index: int
    id: str | None
    name: str | None
    arguments: str

    def to_openai(self) -> dict:
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {
            "index": self.index,
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


StreamEvent = ContentDelta | ToolCallDelta
