"""What SIGTERM does to requests in flight: they get the grace period to finish; those still running at
its end are ended with an error the client can read (a 503 envelope, or an SSE error event and
`[DONE]`), never cut off silently when uvicorn cancels what is left."""

from __future__ import annotations

import asyncio
import logging

from server.errors import APIError
from server.generation import Generation

logger = logging.getLogger("kiln.server")

# Time kept between ending the requests and uvicorn's own deadline, for their last bytes to go out.
FLUSH_SECONDS = 2.0


def shutting_down_error() -> APIError:
    return APIError(
        503,
        "The server is shutting down and ended this request before it finished; retry it.",
        "service_unavailable_error",
        code="server_shutting_down",
    )


def draining_error() -> APIError:
    return APIError(
        503,
        "The server is shutting down and takes no new requests; retry on another replica.",
        "service_unavailable_error",
        code="server_shutting_down",
    )


class InFlight:
    """The generations being served, to end at the shutdown deadline."""

    def __init__(self):
        self._generations: set[Generation] = set()
        self._deadline: asyncio.TimerHandle | None = None
        # SIGTERM was received: readiness answers 503 from then on, so that load balancers take the replica out
        # while what is in flight finishes (uvicorn closes its listener only on its next tick, up to 0.1 s later)
        self.draining = False

    def add(self, generation: Generation) -> None:
        self._generations.add(generation)

    def discard(self, generation: Generation) -> None:
        self._generations.discard(generation)

    def __len__(self) -> int:
        return len(self._generations)

    def end_after(self, loop: asyncio.AbstractEventLoop, grace_period: float) -> None:
        """From a signal handler: drain, and end what is still in flight `grace_period` - FLUSH_SECONDS from now."""
        self.draining = True
        if self._deadline is None:
            delay = max(0.0, grace_period - FLUSH_SECONDS)
            loop.call_soon_threadsafe(self._schedule, loop, delay)

    def _schedule(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        if self._deadline is None:
            self._deadline = loop.call_later(delay, self.end_all)

    def end_all(self) -> None:
        if self._generations:
            logger.warning("Shutdown deadline: ending %d request(s) still in flight", len(self._generations))
        for generation in list(self._generations):
            generation.fail(shutting_down_error())
