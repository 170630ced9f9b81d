"""SSE framing: OpenAI's `data:` lines, `[DONE]` last, an error mid-stream as an error event."""

from __future__ import annotations

import asyncio
import json

from sse_starlette.event import ensure_bytes

from engines.base import EngineDeadError
from server.protocol import ChatChunkChoice, ChatCompletionChunk, ChatDelta
from server.streaming import openai_events


def chunk(text: str) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id="chatcmpl-1", created=0, model="m", choices=[ChatChunkChoice(index=0, delta=ChatDelta(content=text))]
    )


def wire(chunks) -> bytes:
    async def collect():
        return [ensure_bytes(event, "\n") async for event in openai_events(chunks())]

    return b"".join(asyncio.run(collect()))


def test_events_are_data_lines_ending_with_done():
    async def chunks():
        yield chunk("Hel")
        yield chunk("lo\nworld")

    body = wire(chunks)
    frames = body.decode().split("\n\n")
    assert frames[-1] == ""
    assert frames[-2] == "data: [DONE]"
    first = json.loads(frames[0].removeprefix("data: "))
    assert first["choices"][0]["delta"] == {"content": "Hel"}
    assert "\n" not in frames[1]  # a newline in content is escaped inside one JSON line
    assert json.loads(frames[1].removeprefix("data: "))["choices"][0]["delta"]["content"] == "lo\nworld"


def test_error_mid_stream_is_an_error_event_then_done():
    async def chunks():
        yield chunk("partial")
        raise EngineDeadError("The engine stopped.")

    frames = wire(chunks).decode().split("\n\n")
    error = json.loads(frames[1].removeprefix("data: "))
    assert error == {
        "error": {
            "message": "The engine stopped.",
            "type": "service_unavailable_error",
            "param": None,
            "code": "engine_dead",
        }
    }
    assert frames[2] == "data: [DONE]"


def test_delta_omits_unset_fields():
    first = ChatDelta(role="assistant", content="")
    assert json.loads(first.model_dump_json()) == {"role": "assistant", "content": ""}
    assert json.loads(ChatDelta().model_dump_json()) == {}
