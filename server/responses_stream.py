"""A Responses API stream: every event as `event: <type>` and `data: <json>` with its sequence_number, and no
`[DONE]` (chat's framing in server/streaming.py has only `data:` lines). An error met mid-stream ends it with
an `error` event. Otherwise as server/respond.py: the engine requests are aborted however the stream ends."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator

from fastapi import Request

from server.errors import from_exception
from server.generation import Generation
from server.respond import generation_sse, start_in_flight


async def stream_response(request: Request, generation: Generation, events: AsyncIterator[dict]):
    """`events`: dicts with their "type"; a refusal by the engine is still an HTTP status (start() raises)."""
    close = await start_in_flight(request, generation)

    async def framed():
        sequence = itertools.count()
        try:
            async for event in events:
                yield _frame({**event, "sequence_number": next(sequence)})
        except Exception as exc:  # noqa: BLE001 - the status line is long gone; the client reads the event
            error = from_exception(exc)
            yield _frame(
                {
                    "type": "error",
                    "code": error.code,
                    "message": error.message,
                    "param": error.param,
                    "sequence_number": next(sequence),
                }
            )
        finally:
            await close()

    return generation_sse(request, generation, framed(), close)


def _frame(event: dict) -> dict:
    return {"event": event["type"], "data": json.dumps(event, ensure_ascii=False)}
