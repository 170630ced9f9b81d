"""Fake tensorrt_llm.executor.result.IterationResult: how TensorRT-LLM 1.0 hands out iteration stats.

The real one (executor/result.py IterationResult, its queue from llmapi/utils.py AsyncQueue) is created by
GenerationExecutor._maybe_initialize_iteration_results on the first generate_async, in the thread that calls it:
kiln calls it in the event loop, so the queue is an AsyncQueue and `queue` its _SyncQueue. Each engine iteration
puts one JSON string. Reading it:
- `get_results()` (LLM.get_stats) loops `json.loads(queue.get(timeout))` until an empty queue marks it done. From
  a thread, _SyncQueue.get returns None when the timeout passes instead of raising Empty, so json.loads(None) raises
  TypeError and every stats record read so far is lost; the first sync get also taints the AsyncQueue, after which
  its async get raises AsyncQueue.MixedSyncAsyncAPIError.
- `async for` (LLM.get_stats_async) yields the records, and a get that times out marks it done and ends the loop.
- Done latches: both return nothing until the next generate_async calls mark_undone().
Before any request, LLM.get_stats returns [] and LLM.get_stats_async an async iterable that ends at once
(GenerationExecutor.get_stats / aget_stats, executor/executor.py)."""

from __future__ import annotations

import asyncio
import collections
import json
import time


class MixedSyncAsyncAPIError(Exception):
    """llmapi/utils.py AsyncQueue.MixedSyncAsyncAPIError."""


class IterationResult:
    def __init__(self):
        self._done = False
        self._timeout = 2.0
        self._records: collections.deque[str] = collections.deque()
        self._tainted = False

    def put(self, record: dict) -> None:
        """The executor's stats thread: one engine iteration's stats, as JSON text."""
        self._records.append(json.dumps(record))

    def set_timeout(self, timeout: float) -> None:
        self._timeout = timeout

    def mark_undone(self) -> None:
        self._done = False

    def _sync_get(self, timeout: float) -> str | None:
        """_SyncQueue.get: polls the deque every 10 ms until the deadline, then falls off the end (None)."""
        self._tainted = True
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self._records:
                return self._records.popleft()
            time.sleep(0.01)
        return None

    def get_results(self) -> list[dict]:
        results = []
        while not self._done:
            results.append(json.loads(self._sync_get(self._timeout)))  # TypeError on None, as in the real one
        return results

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        if self._done:
            raise StopAsyncIteration
        if self._tainted:
            raise MixedSyncAsyncAPIError()
        deadline = time.monotonic() + self._timeout
        while not self._records:
            if time.monotonic() >= deadline:
                self._done = True
                raise StopAsyncIteration
            await asyncio.sleep(0.01)
        return json.loads(self._records.popleft())


async def empty_async_iterable():
    """executor/executor.py empty_async_iterable: what aget_stats returns before any request."""
    return
    yield
