"""SSE framing (through sse-starlette) in OpenAI's dialect: `data: <json>` events, `data: [DONE]` last,
and an error met mid-stream sent as `data: {"error": {...}}` before `[DONE]`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask

from server.errors import from_exception

DONE = {"data": "[DONE]"}


def event(model: BaseModel) -> dict:
    return {"data": model.model_dump_json()}


def error_event(exc: BaseException) -> dict:
    return {"data": json.dumps(from_exception(exc).body(), ensure_ascii=False)}


async def openai_events(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[dict]:
    """Frame a stream of chunk models; an exception ends the stream with an error event."""
    try:
        async for chunk in chunks:
            yield event(chunk)
    except Exception as exc:  # noqa: BLE001 - the status line is long gone; the client reads the event
        yield error_event(exc)
    yield DONE


def sse_response(
    events: AsyncIterator[dict],
    on_close,
    grace_period: float,
    keepalive_seconds: float,
    keepalive_comment: Callable[[], str],
) -> EventSourceResponse:
    """An SSE response that calls `on_close` however it ends (done, disconnect or shutdown).

    Its headers go out at once, and an SSE comment (`: <keepalive_comment()>`, which clients ignore) every
    `keepalive_seconds` keeps proxies with read timeouts from dropping a stream that waits in the queue.
    On SIGTERM, streams get `grace_period` seconds to finish before they are cancelled."""
    return EventSourceResponse(
        events,
        sep="\n",
        background=BackgroundTask(on_close),
        shutdown_grace_period=grace_period,
        ping=keepalive_seconds,
        ping_message_factory=lambda: ServerSentEvent(comment=keepalive_comment(), sep="\n"),
    )
