"""Run tokenizer and chat-template work on a worker thread when its input is large, so that the event
loop keeps answering health checks and other streams meanwhile. Small inputs stay on the loop, where
they cost less than the thread hop. (The Rust tokenizer releases the GIL while it encodes; a Jinja
template is Python, which yields the GIL every few milliseconds.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio

T = TypeVar("T")

LARGE_INPUT_CHARS = 32_768


async def run_sized(num_chars: int, fn: Callable[..., T], *args) -> T:
    if num_chars < LARGE_INPUT_CHARS:
        return fn(*args)
    return await anyio.to_thread.run_sync(fn, *args)
