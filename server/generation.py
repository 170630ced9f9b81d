"""One API request's run through the engine: its engine requests (one per prompt, each with n
choices), and each choice's text pipeline (tokens -> detokenizer -> stop strings).

Both endpoints, streaming or not, consume a `Generation` the same way: `start()` submits every
engine request (the engine accepts or refuses each at once, so a full queue or a dead engine is still
an HTTP status, not a mid-stream error), then iterating yields one list of `ChoiceDelta` per engine
output. `aclose()` aborts whatever is still running; it is safe to call more than once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import cast

import anyio

from engines.base import (
    CompletionOutput,
    Engine,
    GenerationOutput,
    GenerationRequest,
    RequestTimings,
    SamplingParams,
    TokenLogprob,
)
from server.detokenize import IncrementalDetokenizer
from server.errors import APIError
from server.metrics import ServerMetrics
from server.protocol import PromptTokensDetails, Usage
from server.stop_strings import StopStringDetector

logger = logging.getLogger("kiln.server")

_END = object()


@dataclass
class ChoiceDelta:
    """What one choice gained from one engine output, after detokenization and stop strings."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_tokens: int = (
        0  # tokens generated in this delta; its text may lag (an incomplete character, a possible stop string)
    )

    def needs_chunk(self, has_content: bool, wants_logprobs: bool) -> bool:
        """Whether a stream sends a chunk for this delta (chat and completions alike): when it has content to
        show; like vLLM, for every step that generated tokens even while their text is held back, so the client
        sees the stream move (and its time to first token) at once, except on the last step, whose finish
        chunk follows anyway; and when it carries logprobs the client asked for."""
        return (
            has_content
            or (self.num_tokens > 0 and self.finish_reason is None)
            or (wants_logprobs and bool(self.logprobs))
        )


class ChoiceState:
    def __init__(self, index: int, tokenizer, prompt_token_ids: list[int], stop: list[str], min_tokens: int):
        self.index = index
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids)
        self.stop = StopStringDetector(stop)
        self.min_tokens = min_tokens
        self.num_tokens = 0
        self.finish_reason: str | None = None

    def process(self, output: CompletionOutput) -> ChoiceDelta | None:
        if self.finish_reason is not None:  # already stopped by a stop string; the engine lags behind
            return None
        if output.finish_reason == "abort":
            raise APIError(
                503,
                "The request was aborted by the engine (is the server shutting down?).",
                "service_unavailable_error",
                code="request_aborted",
            )
        delta = ChoiceDelta(self.index)
        pieces: list[str] = []
        last = len(output.new_token_ids) - 1
        for i, token_id in enumerate(output.new_token_ids):
            self.num_tokens += 1
            delta.num_tokens += 1
            if output.new_logprobs:
                delta.logprobs.append(output.new_logprobs[i])
            # A stop token's text is not part of the completion (EOS is special and skipped anyway).
            if i == last and output.finish_reason is not None and token_id == output.stop_token_id:
                continue
            text = self.detokenizer.add(token_id)
            # Like vLLM, stop strings count only once min_tokens are out.
            pieces.append(text if self.num_tokens < self.min_tokens else self.stop.feed(text))
            if self.stop.stopped:
                self.finish_reason = "stop"
                break
        if output.finish_reason is not None and self.finish_reason is None:
            pieces.append(self.stop.feed(self.detokenizer.flush()))
            pieces.append(self.stop.flush())
            self.finish_reason = "stop" if self.stop.stopped else output.finish_reason
        delta.text = "".join(pieces)
        delta.finish_reason = self.finish_reason
        return delta


@dataclass
class ChoiceResult:
    """A whole choice, for non-streaming responses."""

    index: int
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str
    num_tokens: int


class Generation:
    def __init__(
        self,
        engine: Engine,
        metrics: ServerMetrics,
        model_name: str,
        request_id: str,
        prompts: list[tuple[list[int], SamplingParams]],
        stop: list[str],
        speculative: bool = True,
    ):
        self.engine = engine
        self.metrics = metrics
        self.model_name = model_name
        self.request_id = request_id  # the engine request ids are <request_id>-<i>
        self.requests = [
            GenerationRequest(f"{request_id}-{i}", token_ids, params, speculative=speculative)
            for i, (token_ids, params) in enumerate(prompts)
        ]
        self.choices: list[ChoiceState] = []
        self._choices_of: list[list[ChoiceState]] = []
        for request in self.requests:
            params = request.sampling_params
            own = [
                ChoiceState(len(self.choices) + j, engine.tokenizer, request.prompt_token_ids, stop, params.min_tokens)
                for j in range(params.n)
            ]
            self.choices.extend(own)
            self._choices_of.append(own)
        self.num_prompt_tokens = sum(len(r.prompt_token_ids) for r in self.requests)
        self._cached_tokens = [0] * len(self.requests)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._ended = [False] * len(self.requests)  # its engine stream ended (finished or failed)
        self._last_output_at: list[float | None] = [None] * len(self.requests)
        # each engine request's timings, from its latest output (None before its first): for tracing
        self.timings: list[RequestTimings | None] = [None] * len(self.requests)
        self._reported = [False] * len(self.requests)  # its end-of-request metrics are observed
        self.has_output = False  # an engine output arrived (before it, the requests are queued)
        # choice index -> its request's prompt logprobs (when asked for), from the request's first output
        self.prompt_logprobs: dict[int, list[TokenLogprob | None]] = {}
        self._started_at: float | None = None
        self._closed = False

    # ---- engine side ----------------------------------------------------------------------------
    async def _pump(self, index: int, outputs) -> None:
        try:
            async for output in outputs:
                self._queue.put_nowait((index, output))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._ended[index] = True
            self._queue.put_nowait((index, exc))
        else:
            self._ended[index] = True
            self._queue.put_nowait((index, _END))

    async def start(self) -> None:
        """Submit every engine request. The engine accepts or refuses each at once, so a refusal
        (ValueError, EngineOverloadedError, EngineDeadError) is raised here, after the requests already
        accepted are aborted, while the caller can still answer with an HTTP status."""
        self._started_at = time.monotonic()
        try:
            for request in self.requests:
                await self.engine.prepare(request)
            for index, request in enumerate(self.requests):
                outputs = self.engine.generate(request)
                self._tasks.append(asyncio.create_task(self._pump(index, outputs)))
        except BaseException:
            await self.aclose()
            raise

    def fail(self, exc: BaseException) -> None:
        """End the generation with `exc`: the consumer raises it next (the engine requests are aborted
        when the consumer closes the generation)."""
        self._queue.put_nowait((None, exc))

    async def aclose(self) -> None:
        """Abort every engine request still running: cancelling a pump ends its iteration, which the
        Engine contract turns into an abort that frees the KV blocks, and `abort()` covers a request
        whose iteration never started. Shielded, because callers are often being cancelled themselves."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for request, ended in zip(self.requests, self._ended):
                if not ended:
                    await self.engine.abort(request.request_id)
        self._log_end()

    def _log_end(self) -> None:
        """One line per API request that reached the engine, found by its request id in the log."""
        if self._started_at is None:
            return
        usage = self.usage()
        reasons = ",".join(choice.finish_reason or "unfinished" for choice in self.choices)
        logger.info(
            "Engine requests %s-* ended after %.3f s (%s): %d prompt, %d completion tokens",
            self.request_id,
            time.monotonic() - self._started_at,
            reasons,
            usage.prompt_tokens,
            usage.completion_tokens,
        )

    # ---- server side ----------------------------------------------------------------------------
    def _process(self, index: int, output: GenerationOutput) -> list[ChoiceDelta]:
        self.has_output = True
        now = time.monotonic()
        last = self._last_output_at[index]
        if last is None:
            self.metrics.observe_first_output(self.model_name, output.timings, now)
        else:
            self.metrics.observe_inter_token(self.model_name, now - last)
        self._last_output_at[index] = now
        self.timings[index] = output.timings
        self._cached_tokens[index] = max(self._cached_tokens[index], output.num_cached_tokens)
        own = self._choices_of[index]
        if output.prompt_logprobs is not None:
            for choice in own:
                self.prompt_logprobs[choice.index] = output.prompt_logprobs
        deltas = []
        for completion in output.outputs:
            delta = own[completion.index].process(completion)
            if delta is not None:
                deltas.append(delta)
        if not self._reported[index] and all(choice.finish_reason for choice in own):
            self._reported[index] = True
            # every finish_reason is set (checked just above)
            reasons = cast(list[str], [c.finish_reason for c in own])
            self.metrics.observe_finished(self.model_name, output.timings, now, reasons)
        return deltas

    @property
    def finished(self) -> bool:
        return all(choice.finish_reason for choice in self.choices)

    async def __aiter__(self):
        try:
            while not self.finished:
                index, item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item is _END:
                    if not all(c.finish_reason for c in self._choices_of[index]):
                        raise APIError(500, "The engine ended a request without finishing it.", "server_error")
                    continue
                deltas = self._process(index, item)
                if deltas:
                    yield deltas
        finally:
            await self.aclose()

    async def collect(self) -> list[ChoiceResult]:
        texts: list[list[str]] = [[] for _ in self.choices]
        logprobs: list[list[TokenLogprob]] = [[] for _ in self.choices]
        async for deltas in self:
            for delta in deltas:
                texts[delta.index].append(delta.text)
                logprobs[delta.index].extend(delta.logprobs)
        # iterating ends only once every choice is finished, so each finish_reason is set
        return [
            ChoiceResult(c.index, "".join(texts[c.index]), logprobs[c.index], cast(str, c.finish_reason), c.num_tokens)
            for c in self.choices
        ]

    def usage(self) -> Usage:
        completion = sum(choice.num_tokens for choice in self.choices)
        return Usage(
            prompt_tokens=self.num_prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.num_prompt_tokens + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self._cached_tokens)),
        )
