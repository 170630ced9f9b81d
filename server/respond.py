"""The shared tail of both generation endpoints: run a `Generation` to a JSON body or an SSE stream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import Request
from pydantic import BaseModel

from server.disconnect import run_until_disconnected
from server.generation import ChoiceResult, Generation
from server.shutdown import draining_error
from server.streaming import openai_events, sse_response


async def respond(
    request: Request,
    generation: Generation,
    stream: bool,
    make_response: Callable[[list[ChoiceResult]], BaseModel],
    make_chunks: Callable[[], AsyncIterator[BaseModel]],
):
    """A refusal by the engine (invalid, queue full, engine dead) is an HTTP status; a stream's headers go
    out as soon as its requests are accepted, and later errors are error events in it. The engine requests
    are aborted however the response ends (including client disconnects and the shutdown deadline)."""
    close = await start_in_flight(request, generation)
    if not stream:
        try:
            return make_response(await run_until_disconnected(request, generation.collect()))
        finally:
            await close()

    async def chunks():
        try:
            async for chunk in make_chunks():
                yield chunk
        finally:
            await close()

    return generation_sse(request, generation, openai_events(chunks()), close)


async def start_in_flight(request: Request, generation: Generation) -> Callable[[], Awaitable[None]]:
    """Submit the generation's engine requests (a refusal raises here, while an HTTP status can still answer it)
    and count it in flight (the shutdown deadline ends what is in flight); the returned close() aborts what is
    left, uncounts it and, with tracing on, records its span."""
    in_flight = request.app.state.in_flight
    tracer = request.app.state.tracer
    if in_flight.draining:
        # SIGTERM came and uvicorn closes its listener on its next tick: a request on a connection accepted in that
        # moment would start work the grace period is meant to end, so it is sent elsewhere (the readiness check
        # already answers 503)
        raise draining_error()
    await generation.start()
    in_flight.add(generation)
    closed = False

    async def close() -> None:
        nonlocal closed
        if closed:  # a stream closes both from its generator and from the response's background task
            return
        closed = True
        in_flight.discard(generation)
        await generation.aclose()
        if tracer is not None:
            tracer.record(request.state.request_id, request.headers, generation)

    return close


def generation_sse(
    request: Request, generation: Generation, events: AsyncIterator[dict], close: Callable[[], Awaitable[None]]
):
    """The SSE response of a generation's events, with keep-alive comments that say whether it is still queued."""
    settings = request.app.state.settings
    return sse_response(
        events,
        close,
        settings.stream_grace_period,
        keepalive_seconds=settings.sse_keepalive_seconds,
        keepalive_comment=lambda: "keep-alive" if generation.has_output else "queued",
    )
