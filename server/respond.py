"""The shared tail of both generation endpoints: run a `Generation` to a JSON body or an SSE stream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from fastapi import Request
from pydantic import BaseModel

from server.disconnect import run_until_disconnected
from server.generation import ChoiceResult, Generation
from server.streaming import openai_events, sse_response


async def respond(
    request: Request,
    generation: Generation,
    stream: bool,
    make_response: Callable[[list[ChoiceResult]], BaseModel],
    make_chunks: Callable[[], AsyncIterator[BaseModel]],
):
    """Errors before the first output become HTTP statuses; later ones, error events in the stream.
    The engine requests are aborted however the response ends (including client disconnects)."""
    try:
        await run_until_disconnected(request, generation.start())
        if not stream:
            return make_response(await run_until_disconnected(request, generation.collect()))
    except BaseException:
        await generation.aclose()
        raise

    async def chunks():
        try:
            async for chunk in make_chunks():
                yield chunk
        finally:
            await generation.aclose()

    grace_period = request.app.state.settings.stream_grace_period
    return sse_response(openai_events(chunks()), generation.aclose, grace_period)
