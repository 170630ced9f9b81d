"""`TrtllmEngine`: kiln's Engine interface over a TensorRT engine run by TensorRT-LLM's LLM API.

Each request is one `LLM.generate_async(prompt_token_ids, SamplingParams, streaming=True)`, called in the
server's running event loop (TensorRT-LLM gives a result created there an asyncio queue); its
RequestOutputs stream as kiln GenerationOutputs built from each CompletionOutput's token_ids_diff,
logprobs_diff and finish_reason. Detokenization, stop strings and the OpenAI shapes stay in kiln's server,
as for the torch backend. A closed stream or `abort()` calls the result's `abort()`.

Metrics: kiln counts its own requests (waiting: submitted, no output yet, which on a TensorRT engine covers both
the executor's queue and the prefill, since the first RequestOutput carries the first token; running: streaming
output, not finished). A background task reads KV-cache and block-reuse figures from `LLM.get_stats_async`, the
iteration stats as TensorRT-LLM 1.0 hands them out (see `_poll_stats`), into the same EngineStats the torch
engine keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from engines import parallel
from engines.base import (
    BuiltEngine,
    CompletionOutput,
    Engine,
    EngineDeadError,
    EngineDetails,
    EngineInfo,
    EngineStats,
    GenerationOutput,
    GenerationRequest,
    RequestFailedError,
    RequestTimings,
    TokenLogprob,
    check_request_fits,
)
from engines.build.manifest import Manifest
from engines.config import EngineConfig
from engines.trtllm import api as trt
from engines.trtllm import configs
from engines.trtllm.limits import check_prompt_fits
from engines.trtllm.stats import apply_iteration_stats

log = logging.getLogger("kiln.engine.trtllm")

FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort", "timeout": "abort"}
STATS_POLL_SECONDS = 1.0


class TrtllmEngine(Engine):
    def __init__(self, llm, api: trt.TrtllmApi, tokenizer, manifest: Manifest, config: EngineConfig, folder: Path):
        self.llm = llm
        self.api = api
        self._tokenizer = tokenizer
        self.manifest = manifest
        self.config = config
        self._results: dict[str, object] = {}
        self._stats = EngineStats()
        self._stats_task: asyncio.Task | None = None
        self._dead: BaseException | None = None
        self._started = False
        # the LLM was given gather_generation_logits (the engine was built with it): logprobs can be served
        self.gather_logits = _gathers_logits(manifest)
        eos = tokenizer.eos_token_id
        self.eos_token_ids = [eos] if eos is not None else []
        self.vocab_size = len(tokenizer)
        self._info = EngineInfo(
            model_name=config.served_model_name or manifest.served_model_name or folder.name,
            backend="trtllm",
            dtype=manifest.precision,
            kv_cache_dtype=manifest.kv_cache_dtype,
            device="cuda",
            max_model_len=manifest.max_model_len or 0,
            vocab_size=self.vocab_size,
            eos_token_ids=self.eos_token_ids,
            block_size=0,  # TensorRT-LLM's tokens per block, known from its first iteration stats
            num_kv_blocks=0,
            details=EngineDetails(
                precision=manifest.precision,
                versions={"tensorrt_llm": api.version},
                engine=BuiltEngine(
                    precision=manifest.precision,
                    kv_cache_dtype=manifest.kv_cache_dtype,
                    created=manifest.created,
                    kiln_version=manifest.kiln_version,
                    built_for=manifest.target.description,
                ),
                scheduler_policy=config.scheduler_policy,
            ),
        )

    @classmethod
    def from_config(cls, config: EngineConfig) -> TrtllmEngine:
        """Check the engine directory and the GPU, then load the engine (blocking: the server calls this in
        its loader thread)."""
        from transformers import AutoTokenizer

        from engines.build import manifest as mf
        from engines.hardware import detect

        configs.check_no_speculation(config.speculative_method)
        folder = Path(config.engine_dir).expanduser()
        manifest = mf.load_manifest(folder)
        if manifest.backend != "trtllm":
            raise mf.EngineDirError(f"{folder} holds a {manifest.backend} engine, not a TensorRT-LLM one.")
        api = trt.load()
        hardware = detect("cuda")
        if hardware.device != "cuda":
            raise trt.TrtllmUnavailable("the trtllm backend needs an NVIDIA GPU and torch sees none.")
        mf.check_hardware(manifest, hardware)
        split = parallel.serve_split(
            manifest.trtllm, config.tensor_parallel_size, config.pipeline_parallel_size, hardware
        )
        tokenizer = AutoTokenizer.from_pretrained(folder)
        # gather_generation_logits is an LLM argument (BaseLlmArgs, llmapi/llm_args.py) that the executor can only
        # honour on an engine compiled with BuildConfig(gather_generation_logits=True), so it follows the manifest
        gather = {"gather_generation_logits": True} if _gathers_logits(manifest) else {}
        llm = api.llm_class(
            model=str(folder / (manifest.trtllm.engine_dir if manifest.trtllm else "trtllm")),
            tokenizer=str(folder),
            kv_cache_config=configs.kv_cache_config(api, config.gpu_memory_fraction, config.enable_prefix_caching),
            scheduler_config=configs.scheduler_config(api, config.scheduler_policy),
            guided_decoding_backend=configs.GUIDED_DECODING_BACKEND,  # structured output (see configs)
            **gather,
            # only where the build kept paged context FMHA, which chunked context needs (engines/trtllm/limits.py)
            **({"enable_chunked_prefill": True} if manifest.trtllm and manifest.trtllm.chunked_prefill else {}),
            **split.llm_kwargs(),  # a split engine: BaseLLM.__init__ spawns its MPI workers (engines/parallel.py)
        )
        return cls(llm, api, tokenizer, manifest, config, folder)

    # ---- Engine interface -----------------------------------------------------------------------
    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def is_alive(self) -> bool:
        return self._started and self._dead is None

    async def start(self) -> None:
        self._started = True
        self._stats_task = asyncio.get_running_loop().create_task(self._poll_stats())

    async def shutdown(self) -> None:
        for result in list(self._results.values()):
            result.abort()
        if self._stats_task is not None:
            self._stats_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stats_task
        await asyncio.to_thread(self.llm.shutdown)
        self._dead = self._dead or EngineDeadError("The engine shut down.")

    def stats(self) -> EngineStats:
        return self._stats

    async def abort(self, request_id: str) -> None:
        result = self._results.pop(request_id, None)
        if result is not None:
            result.abort()

    def check_request(self, request: GenerationRequest) -> None:
        check_request_fits(request, self.vocab_size, self._info.max_model_len)
        check_prompt_fits(request, self.manifest)
        if request.request_id in self._results:
            raise ValueError(f"Request id {request.request_id!r} is already in use.")

    async def prepare(self, request: GenerationRequest) -> None:
        """Check a structured constraint (xgrammar parses it, cached by constraint) off the event loop."""
        if request.sampling_params.structured is not None:
            await asyncio.to_thread(configs.guided_decoding, self.api, request.sampling_params.structured)

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        if not self.is_alive:
            raise EngineDeadError("The engine is not running.")
        self.check_request(request)
        params = configs.sampling_params(
            self.api, request.sampling_params, self.eos_token_ids, self.vocab_size, self.gather_logits
        )
        timings = RequestTimings(arrival=request.arrival_time)
        result = self.llm.generate_async(request.prompt_token_ids, sampling_params=params, streaming=True)
        self._results[request.request_id] = result
        self._stats.prompt_tokens += len(request.prompt_token_ids)
        timings.first_scheduled = time.monotonic()
        return self._outputs(request, result, timings)

    async def _outputs(
        self, request: GenerationRequest, result, timings: RequestTimings
    ) -> AsyncIterator[GenerationOutput]:
        finished = False
        running = False
        self._stats.num_waiting += 1
        # a greedy request ran as one sequence (see configs.sampling_params): each delta is copied into the n choices
        copies = request.sampling_params.n if request.sampling_params.greedy else 1
        try:
            async for output in self._results_of(result):
                if not running:
                    running = True
                    self._stats.num_waiting -= 1
                    self._stats.num_running += 1
                deltas = [self._delta(c, request.sampling_params.logprobs) for c in output.outputs]
                if copies > 1:
                    deltas = [dataclasses.replace(deltas[0], index=i) for i in range(copies)]
                generated = sum(len(d.new_token_ids) for d in deltas)
                self._stats.generation_tokens += generated
                if generated and timings.first_token is None:
                    timings.first_token = time.monotonic()
                finished = bool(output.finished)
                if finished:
                    timings.finished = time.monotonic()
                yield GenerationOutput(request.request_id, deltas, len(request.prompt_token_ids), 0, finished, timings)
                if finished:
                    return
        finally:
            if running:
                self._stats.num_running -= 1
            else:
                self._stats.num_waiting -= 1
            self._results.pop(request.request_id, None)
            if not finished:
                result.abort()

    async def _results_of(self, result) -> AsyncIterator:
        """The result's RequestOutputs, its failures told apart as TensorRT-LLM 1.0 raises them: the executor's
        error response for this one request reaches the result (executor/result.py
        GenerationResultBase._handle_response hands its error_msg to the executor's background error handler) and
        executor/executor.py GenerationExecutor._handle_background_error raises it as RequestError, serving on;
        any other error there is the executor's own, and that handler shuts the executor down before raising it."""
        try:
            async for output in result:
                yield output
        except self.api.request_error as exc:
            raise RequestFailedError(f"TensorRT-LLM failed the request: {exc}") from exc
        except Exception as exc:
            dead = EngineDeadError(f"TensorRT-LLM's executor stopped: {exc}")
            if self._dead is None:
                log.error("TensorRT-LLM's executor stopped; no request can be served any more.", exc_info=exc)
                self._dead = dead
            raise dead from exc

    def _delta(self, completion, top_k: int | None) -> CompletionOutput:
        new = list(completion.token_ids_diff)
        reason = FINISH_REASONS.get(completion.finish_reason) if completion.finish_reason else None
        stop = completion.stop_reason if isinstance(completion.stop_reason, int) else None
        return CompletionOutput(
            index=completion.index,
            new_token_ids=new,
            new_logprobs=_logprobs(new, completion.logprobs_diff, top_k or 0) if top_k is not None else None,
            num_generated=len(completion.token_ids),
            finish_reason=reason,
            stop_token_id=stop,
        )

    async def _poll_stats(self) -> None:
        """Iteration stats through `LLM.get_stats_async` (GenerationExecutor.aget_stats, executor/executor.py): an
        async iterable of dicts (executor/result.py IterationResult) that ends when no record came within the timeout,
        and stays ended until the next request is submitted; before the first request it ends at once. So it is read
        again after a pause whenever it ends. Not `LLM.get_stats`: from a thread, its queue's get returns None on a
        timeout and json.loads(None) raises, losing the records read, and that sync get taints the queue for the
        async reader."""
        while True:
            try:
                async for iteration in self.llm.get_stats_async(STATS_POLL_SECONDS):
                    self._apply(iteration)
            except Exception as exc:  # stats are best effort: a failing read is logged, serving goes on
                log.debug("get_stats_async failed: %s", exc)
            await asyncio.sleep(STATS_POLL_SECONDS)

    def _apply(self, iteration: dict) -> None:
        apply_iteration_stats(self._stats, iteration)
        kv = iteration.get("kvCacheStats") or {}
        if kv.get("tokensPerBlock"):
            self._info.block_size = int(kv["tokensPerBlock"])
            self._info.num_kv_blocks = self._stats.kv_blocks_total


def _gathers_logits(manifest: Manifest) -> bool:
    """The engine was built with BuildConfig(gather_generation_logits=True) (`kiln build --gather-logits`)."""
    return bool(manifest.trtllm and manifest.trtllm.gather_generation_logits)


def _logprobs(tokens: list[int], entries, top_k: int) -> list[TokenLogprob]:
    """TensorRT-LLM's logprobs_diff as kiln TokenLogprobs. On a TensorRT engine each entry is a dict
    {token_id: Logprob(logprob, rank)} (executor/result.py compute_logprobs): the top k by rank 1..k plus the sampled
    token with its own rank when it is not among them. top_k 0 keeps the sampled token's logprob and no list."""
    out = []
    for token, entry in zip(tokens, entries):
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)
        top = [(tid, lp.logprob) for tid, lp in ranked if lp.rank <= top_k]
        out.append(TokenLogprob(token, entry[token].logprob, top))
    return out
