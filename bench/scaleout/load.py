"""Client load through the official openai SDK: one chat completion (streamed or not) that reports which replica
answered, a closed loop of workers until told to stop, and a fixed request list at bounded concurrency."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from openai import AsyncOpenAI

REQUEST_TIMEOUT_S = 300  # a loaded 2-core machine is slow; a timeout is a failure, so it must be generous
REPLICA_HEADER = "x-kiln-replica"  # set by the proxy in front (haproxy's server name); absent when direct


@dataclass
class Outcome:
    started: float  # monotonic seconds
    finished: float
    stream: bool
    replica: str | None
    ok: bool
    error: str | None = None
    prompt_tokens: int = 0


def client(base_url: str) -> AsyncOpenAI:
    # max_retries=0: the SDK must not hide a failure behind its own retry; retries are the proxy's job here
    return AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)


async def chat(api: AsyncOpenAI, model: str, messages: list[dict], max_tokens: int, stream: bool) -> Outcome:
    """One chat completion; ok when it ends with a finish_reason (a stream: its last chunk) and no error."""
    started = time.monotonic()
    replica = None
    try:
        raw = await api.chat.completions.with_raw_response.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=stream
        )
        replica = raw.headers.get(REPLICA_HEADER)
        body = raw.parse()  # the SDK's async raw response parses synchronously (a stream is read below)
        if stream:
            finish_reasons = [choice.finish_reason async for chunk in body for choice in chunk.choices]
            ok, prompt_tokens = bool(finish_reasons) and finish_reasons[-1] is not None, 0
        else:
            ok, prompt_tokens = body.choices[0].finish_reason is not None, body.usage.prompt_tokens
        error = None if ok else "no finish_reason"
    except Exception as exc:  # every failure kind is counted and reported, none may escape
        ok, prompt_tokens, error = False, 0, f"{type(exc).__name__}: {exc}"
    return Outcome(started, time.monotonic(), stream, replica, ok, error, prompt_tokens)


async def closed_loop(workers: int, call: Callable[[int], Awaitable[Outcome]], stop: asyncio.Event) -> list[Outcome]:
    """`workers` loops, each sending its next request as soon as the previous one ended, until `stop` is set."""
    outcomes: list[Outcome] = []
    counter = iter(range(1 << 62))

    async def worker() -> None:
        while not stop.is_set():
            outcomes.append(await call(next(counter)))

    await asyncio.gather(*(worker() for _ in range(workers)))
    return outcomes


async def bounded(calls: list[Callable[[], Awaitable[Outcome]]], concurrency: int) -> list[Outcome]:
    """Every call, in list order, at most `concurrency` at a time."""
    queue = list(reversed(calls))
    outcomes: list[Outcome] = []

    async def worker() -> None:
        while queue:
            outcomes.append(await queue.pop()())

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes
