"""Await a blocking call that runs on a daemon thread.

For the long, one-off work of starting an engine (loading weights, compiling kernels, the warm-up):
asyncio.to_thread's worker threads are joined at interpreter exit, so a SIGTERM during that work would
wait minutes for it; a daemon thread is simply dropped.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def run_in_daemon_thread(fn: Callable[[], T], name: str) -> T:
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(setter, value) -> None:
        if not future.done():
            setter(value)

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the event loop
            loop.call_soon_threadsafe(settle, future.set_exception, exc)
        else:
            loop.call_soon_threadsafe(settle, future.set_result, result)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future
