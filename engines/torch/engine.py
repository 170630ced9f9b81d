"""`AsyncTorchEngine`: the `Engine` interface over `LLMEngine`, with the step loop in its own thread
so a long forward pass never stalls the event loop. Requests and aborts cross into the loop through
a thread-safe inbox; outputs come back through each request's asyncio queue."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import torch

from engines.base import (
    BuiltEngine,
    Engine,
    EngineDeadError,
    EngineDetails,
    EngineInfo,
    EngineOverloadedError,
    EngineStats,
    GenerationOutput,
    GenerationRequest,
    RequestFailedError,
    SamplingParams,
    SpeculationInfo,
)
from engines.build.manifest import Manifest
from engines.config import EngineConfig
from engines.daemon import run_in_daemon_thread
from engines.hardware import detect as detect_hardware
from engines.torch import host_malloc
from engines.torch.llm_engine import LLMEngine
from engines.torch.loader import LoadedModel, build_core, load_model

log = logging.getLogger("kiln.engine")

# Steps that failed one after another (each failing its own requests) before the loop gives up: a fault
# that outlives the requests it met is the engine's, and a restart is the cure.
MAX_CONSECUTIVE_STEP_FAILURES = 8
# The warm-up request: shorter than a KV block, so it leaves nothing in the prefix cache.
WARM_UP_PROMPT_TOKENS = 8
WARM_UP_MAX_TOKENS = 4
# After this long without work the step loop returns freed host memory to the OS (host_malloc.release_free):
# long enough that requests arriving one after another keep the warm heap, short against an idle spell.
IDLE_RELEASE_S = 2.0
# Errors after which the device cannot be trusted with any request: the loop dies and the server exits.
_DEVICE_ERROR_MARKERS = (
    "CUDA error",
    "CUBLAS_STATUS",
    "CUDNN_STATUS",
    "device-side assert",
    "illegal memory access",
    "NCCL error",
)


def is_device_error(exc: BaseException) -> bool:
    return not isinstance(exc, Exception) or any(marker in str(exc) for marker in _DEVICE_ERROR_MARKERS)


def _built_engine(manifest: Manifest | None) -> BuiltEngine | None:
    """What /v1/metadata says about a built engine (None when serving a plain model folder)."""
    if manifest is None:
        return None
    return BuiltEngine(
        precision=manifest.precision,
        kv_cache_dtype=manifest.kv_cache_dtype,
        created=manifest.created,
        kiln_version=manifest.kiln_version,
        built_for=manifest.target.description,
        profile=manifest.profile,
        weight_formats=manifest.weight_formats,
        build_hash=manifest.build_hash,
    )


def _speculation(core: LLMEngine) -> SpeculationInfo | None:
    if core.proposer is None:
        return None
    described = dict(core.proposer.describe())
    return SpeculationInfo(described.pop("method"), core.num_speculative_tokens, described)


class AsyncTorchEngine(Engine):
    def __init__(self, core: LLMEngine, loaded: LoadedModel, config: EngineConfig):
        self.core = core
        self.loaded = loaded
        self.config = config
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stats = core.stats()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: BaseException | None = None
        self._pending_adds = 0  # requests in the inbox not yet seen by the loop (aborts don't count)
        self._pending_lock = threading.Lock()
        self._consecutive_failures = 0  # steps failed in a row (see _step)
        # Grammars compile one at a time, on one core: a schema that takes seconds to compile delays the
        # constrained requests queued behind it, never the steps of the others.
        self._grammar_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-grammar")
        args = loaded.model.args
        self._info = EngineInfo(
            model_name=loaded.name,
            backend="torch",
            dtype=str(loaded.dtype).removeprefix("torch."),
            kv_cache_dtype=str(core.runner.kv_cache.data.dtype).removeprefix("torch."),  # int8, float8_e4m3fn
            device=str(loaded.device),
            max_model_len=core.max_model_len,
            vocab_size=args.vocab_size,
            eos_token_ids=core.eos_token_ids,
            block_size=core.bm.block_size,
            num_kv_blocks=core.bm.num_blocks,
            details=EngineDetails(
                precision=loaded.manifest.precision if loaded.manifest else loaded.quantization,
                profile=loaded.manifest.profile if loaded.manifest else None,
                hardware=detect_hardware().describe(),
                speculative=_speculation(core),
                engine=_built_engine(loaded.manifest),
                architecture=loaded.hf_config.model_type,
                model_source=str(config.engine_dir or config.model or "embedded default"),
                prefix_caching=config.enable_prefix_caching,
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=core.scheduler.max_num_batched_tokens,
                torch_threads=torch.get_num_threads(),
            ),
        )

        log.info(
            "KV cache: %d blocks of %d tokens = %d tokens of capacity (%s, %.0f MiB); max_model_len %d",
            core.bm.num_blocks,
            core.bm.block_size,
            self._info.kv_capacity_tokens,
            self._info.kv_cache_dtype,
            runner_bytes(core) / 2**20,
            core.max_model_len,
        )
        if core.proposer is not None:
            log.info("Speculative decoding: %s", self._info.details.speculative)

    @classmethod
    def from_config(cls, config: EngineConfig, loaded: LoadedModel | None = None) -> AsyncTorchEngine:
        loaded = loaded or load_model(config)
        return cls(build_core(config, loaded), loaded, config)

    # ---- Engine interface -----------------------------------------------------------------------
    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    async def start(self) -> None:
        """Warm up, then start the step loop: a server is ready only once nothing is left to compile."""
        if self._thread is None:
            await run_in_daemon_thread(self._warm_up, "kiln-warm-up")
            self._thread = threading.Thread(target=self._loop, name="kiln-step-loop", daemon=True)
            self._thread.start()

    def _warm_up(self) -> None:
        """Compile (or load from the cache) every CPU kernel this machine can run, then serve one short
        sampled request through the whole step path (prefill, decode, speculation when on), so that the
        first requests after readiness pay no compilation or first-call cost."""
        if self.loaded.device.type == "cpu":
            from engines import cpu_isa
            from engines.torch.kernels import dispatch
            from engines.torch.kernels.registry import KERNELS

            for kernel in KERNELS.values():
                kernel.available()
            self._info.details.cpu_kernels = dispatch.report(compiled=True)
            log.info(
                "CPU kernels at ISA level %s: %s",
                cpu_isa.describe(),
                ", ".join(f"{op} {implementation}" for op, implementation in self._info.details.cpu_kernels.items()),
            )
        prompt = list(range(1, 1 + min(WARM_UP_PROMPT_TOKENS, self.core.max_model_len - WARM_UP_MAX_TOKENS)))
        params = SamplingParams(temperature=1.0, max_tokens=WARM_UP_MAX_TOKENS, ignore_eos=True, seed=0)
        with torch.inference_mode():
            self.core.add_request(GenerationRequest("kiln-warm-up", prompt, params))
            while self.core.has_work():
                self.core.step()
        self.core.reset_counters()
        self._stats = self.core.stats()

    async def shutdown(self) -> None:
        self._stopping = True
        self._inbox.put(("wake",))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._grammar_pool.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> EngineStats:
        return self._stats

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    async def prepare(self, request: GenerationRequest) -> None:
        if request.sampling_params.structured is not None:
            await asyncio.get_running_loop().run_in_executor(self._grammar_pool, self.core.compile_grammar, request)

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        if self._dead is not None or self._stopping:
            raise EngineDeadError("The engine is not running.")
        self.core.check_request(request)
        if self._stats.num_waiting + self._pending_adds >= self.config.max_num_waiting:
            raise EngineOverloadedError(
                f"The server is busy: {self.config.max_num_waiting} requests are already waiting. Retry later."
            )
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request.request_id] = (asyncio.get_running_loop(), stream)
        with self._pending_lock:
            self._pending_adds += 1
        self._inbox.put(("add", request))
        return self._outputs(request.request_id, stream)

    async def _outputs(self, request_id: str, stream: asyncio.Queue) -> AsyncIterator[GenerationOutput]:
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._inbox.put(("abort", request_id))

    # ---- the step loop (its own thread) ---------------------------------------------------------
    def _deliver(self, request_id: str, item) -> None:
        last = isinstance(item, BaseException) or item.finished
        # The last item drops the stream here, not only when its reader ends: a request aborted before
        # anyone iterated its stream leaves nothing behind.
        target = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)

    def _handle(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            request = command[1]
            try:
                self.core.add_request(request)
            except Exception as exc:  # noqa: BLE001 - this request's error, not the loop's
                self._deliver(request.request_id, exc)
            finally:
                with self._pending_lock:
                    self._pending_adds -= 1
            self._stats = self.core.stats()
        elif kind == "abort":
            out = self.core.abort_request(command[1])
            self._stats = self.core.stats()
            if out is not None:
                self._deliver(command[1], out)

    def _step(self) -> list[GenerationOutput]:
        """One engine step. A failure that is not the device's ends the requests of that step (or, in
        sampling, the one request it came from) and the loop goes on."""
        try:
            outputs = self.core.step()
            self._consecutive_failures = 0
        except Exception as exc:
            self._consecutive_failures += 1
            if is_device_error(exc) or self._consecutive_failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                raise
            log.exception("an engine step failed; its requests are ended, the others go on")
            self.core.fail_requests(self.core.step_request_ids, exc)
            outputs = []
        for request_id, exc in self.core.take_failed():
            self._deliver(request_id, RequestFailedError(f"The engine failed on this request: {exc!r}"))
        return outputs

    def _next_command(self) -> tuple:
        """The next command, waiting for it; once idle for IDLE_RELEASE_S, freed host memory goes back first."""
        try:
            return self._inbox.get(timeout=IDLE_RELEASE_S)
        except queue.Empty:
            if self.loaded.device.type == "cpu":
                host_malloc.release_free()
            return self._inbox.get()

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while not self._stopping:
                    if not self.core.has_work():
                        self._handle(self._next_command())
                    while True:
                        try:
                            self._handle(self._inbox.get_nowait())
                        except queue.Empty:
                            break
                    outputs = self._step() if self.core.has_work() else []
                    self._stats = self.core.stats()  # before delivery: a finished stream sees its effect
                    for out in outputs:
                        self._deliver(out.request_id, out)
        except BaseException as exc:  # the loop must never die silently: every waiter learns why
            log.exception("engine step loop died")
            self._dead = exc
        finally:
            for request_id in list(self.core.requests):
                self.core.abort_request(request_id)
            self._stats = self.core.stats()
            error = EngineDeadError(f"The engine stopped: {self._dead!r}" if self._dead else "The engine shut down.")
            for request_id in list(self._streams):
                self._deliver(request_id, error)


def runner_bytes(core: LLMEngine) -> int:
    data = core.runner.kv_cache.data
    return data.numel() * data.element_size()
