"""uvicorn's Server with kiln's shutdown: SIGTERM or SIGINT starts the grace period for requests in flight
(server/shutdown.py) and a clean shutdown exits 0. uvicorn re-raises the signal it handled once it is done,
which makes every orderly stop look like a kill (exit 143) to compose and Kubernetes."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Generator
from types import FrameType

import uvicorn

from server.shutdown import InFlight


class KilnServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, in_flight: InFlight, grace_period: float):
        super().__init__(config)
        self.in_flight = in_flight
        self.grace_period = grace_period
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self.loop is not None:
            self.in_flight.end_after(self.loop, self.grace_period)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
