"""`TrtllmEngine`: kiln's Engine interface over a TensorRT engine run by TensorRT-LLM's LLM API.

Each request is one `LLM.generate_async(prompt_token_ids, SamplingParams, streaming=True)`, called in the
server's running event loop (TensorRT-LLM gives a result created there an asyncio queue); its
RequestOutputs stream as kiln GenerationOutputs built from each CompletionOutput's token_ids_diff,
logprobs_diff and finish_reason. Detokenization, stop strings and the OpenAI shapes stay in kiln's server,
as for the torch backend. A closed stream or `abort()` calls the result's `abort()`. A background task
polls `LLM.get_stats()` into the same EngineStats the torch engine keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

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
    SpeculationInfo,
    TokenLogprob,
    check_request_fits,
)
from engines.build.manifest import Manifest
from engines.config import EngineConfig
from engines.trtllm import api as trt
from engines.trtllm import configs
from engines.trtllm.stats import apply_iteration_stats, apply_prefix_reuse

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
                speculative=(
                    SpeculationInfo(config.speculative_method, config.num_speculative_tokens)
                    if config.speculative_method
                    else None
                ),
            ),
        )

    @classmethod
    def from_config(cls, config: EngineConfig) -> TrtllmEngine:
        """Check the engine directory and the GPU, then load the engine (blocking: the server calls this in
        its loader thread)."""
        from transformers import AutoTokenizer

        from engines.build import manifest as mf
        from engines.hardware import detect

        folder = Path(config.engine_dir).expanduser()
        manifest = mf.load_manifest(folder)
        if manifest.backend != "trtllm":
            raise mf.EngineDirError(f"{folder} holds a {manifest.backend} engine, not a TensorRT-LLM one.")
        api = trt.load()
        hardware = detect("cuda")
        if hardware.device != "cuda":
            raise trt.TrtllmUnavailable("the trtllm backend needs an NVIDIA GPU and torch sees none.")
        mf.check_hardware(manifest, hardware)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        llm = api.llm_class(
            model=str(folder / (manifest.trtllm.engine_dir if manifest.trtllm else "trtllm")),
            tokenizer=str(folder),
            kv_cache_config=configs.kv_cache_config(api, config.gpu_memory_fraction, config.enable_prefix_caching),
            scheduler_config=configs.scheduler_config(api, config.scheduler_policy),
            guided_decoding_backend=configs.GUIDED_DECODING_BACKEND,  # structured output (see configs)
            **(
                {"speculative_config": spec}
                if (
                    spec := configs.speculative_config(
                        api, config.speculative_method, config.num_speculative_tokens, config.speculative_draft
                    )
                )
                else {}
            ),
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
        if request.request_id in self._results:
            raise ValueError(f"Request id {request.request_id!r} is already in use.")

    async def prepare(self, request: GenerationRequest) -> None:
        """Check a structured constraint (xgrammar parses it, cached by constraint) off the event loop."""
        if request.sampling_params.structured is not None:
            await asyncio.to_thread(
                configs.guided_decoding,
                self.api,
                request.sampling_params.structured,
                bool(self.config.speculative_method),
            )

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        if not self.is_alive:
            raise EngineDeadError("The engine is not running.")
        self.check_request(request)
        params = configs.sampling_params(
            self.api,
            request.sampling_params,
            self.eos_token_ids,
            self.vocab_size,
            speculative=bool(self.config.speculative_method),
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
        try:
            async for output in self._results_of(result):
                deltas = [self._delta(c, request.sampling_params.logprobs) for c in output.outputs]
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
        while True:
            try:
                iterations = await asyncio.to_thread(self.llm.get_stats, STATS_POLL_SECONDS)
            except Exception as exc:  # stats are best effort: a failing poll is logged, serving goes on
                log.debug("get_stats failed: %s", exc)
                iterations = []
            for iteration in iterations:
                apply_iteration_stats(self._stats, iteration)
                apply_prefix_reuse(self._stats, iteration)
                kv = iteration.get("kvCacheStats") or {}
                if kv.get("tokensPerBlock"):
                    self._info.block_size = int(kv["tokensPerBlock"])
                    self._info.num_kv_blocks = self._stats.kv_blocks_total
            if not iterations:
                await asyncio.sleep(STATS_POLL_SECONDS)


def _logprobs(tokens: list[int], entries, top_k: int) -> list[TokenLogprob]:
    """TensorRT-LLM's logprobs_diff (per token: {token_id: Logprob(logprob, rank)}, the top-k plus the
    sampled token) as kiln TokenLogprobs."""
    out = []
    for token, entry in zip(tokens, entries):
        if isinstance(entry, dict):
            ranked = sorted(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
            chosen = entry[token].logprob if token in entry else float("nan")
            top = [(tid, lp.logprob) for tid, lp in ranked if lp.rank is not None and lp.rank <= top_k]
            out.append(TokenLogprob(token, chosen, top))
        else:  # older releases: the sampled token's logprob only
            out.append(TokenLogprob(token, float(entry), []))
    return out
