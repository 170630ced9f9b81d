"""Fake tensorrt_llm._tensorrt_engine.LLM: records its arguments, writes a stand-in engine on save(), and
streams deterministic generations through RequestOutput objects shaped like TensorRT-LLM's."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

from tensorrt_llm import _build
from tensorrt_llm._fake import CALLS, FAKE

LLM_FIELDS = frozenset(
    {
        "model",
        "tokenizer",
        "tokenizer_mode",
        "skip_tokenizer_init",
        "trust_remote_code",
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "dtype",
        "revision",
        "build_config",
        "quant_config",
        "calib_config",
        "kv_cache_config",
        "scheduler_config",
        "speculative_config",
        "enable_chunked_prefill",
        "max_batch_size",
        "max_num_tokens",
        "iter_stats_max_iterations",
        "enable_build_cache",
        "guided_decoding_backend",
        "gather_generation_logits",
    }
)
# tensorrt_llm/llmapi/llm_args.py BaseLlmArgs.guided_decoding_backend: Optional[Literal["xgrammar", "llguidance"]]
GUIDED_DECODING_BACKENDS = ("xgrammar", "llguidance")
# cpp/tensorrt_llm/executor/executorImpl.cpp Executor::Impl::fetchNewRequests: a guided request on an executor without
# a GuidedDecodingConfig fails this TLLM_CHECK_WITH_INFO, caught into an error response for that request only
NO_GUIDED_DECODER = (
    "Encountered an error when fetching new request: [TensorRT-LLM][ERROR] Assertion failed: Request "
    "is specified with GuidedDecodingParams, but GuidedDecoder is not setup. Please provide a valid "
    "GuidedDecodingConfig to setup GuidedDecoder."
)
_ids = itertools.count()


class LLM:
    def __init__(self, model, **kwargs):
        unknown = set(kwargs) - LLM_FIELDS
        if unknown:
            raise TypeError(f"LLM got unexpected keyword arguments {sorted(unknown)}")
        backend = kwargs.get("guided_decoding_backend")
        if backend is not None and backend not in GUIDED_DECODING_BACKENDS:  # pydantic's Literal check (a ValueError)
            raise ValueError(
                f"1 validation error for TrtLlmArgs\nguided_decoding_backend\n  Input should be "
                f"'xgrammar' or 'llguidance' [type=literal_error, input_value={backend!r}]"
            )
        if backend == "llguidance":  # _TrtLLM._build_model (llmapi/llm.py) gives TensorRT engines xgrammar only
            raise ValueError(f"Unsupported guided decoding backend {backend}")
        self.tp_size, self.pp_size = _mapping(Path(model), kwargs)
        if self.tp_size * self.pp_size > FAKE.gpus:  # llmapi/llm.py BaseLLM.__init__, before MpiPoolSession spawns
            raise RuntimeError(f"Only {FAKE.gpus} GPUs are available, but {self.tp_size * self.pp_size} are required.")
        self.model = model
        self.kwargs = kwargs
        self.shut_down = False
        self._stats = None  # GenerationExecutor._iter_stats_result: made by the first generate_async
        CALLS.append(("LLM", {"model": model, **kwargs}))
        _check_speculation_fits_engine(model, kwargs.get("speculative_config"))
        # a built engine's config.json has its build_config; a Hugging Face folder is quantized and built first; a
        # path with neither (tests of the LLM API alone, e.g. model="m") gets an executor without length limits
        config_file = Path(model) / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else None
        self.limits = None
        if config is None:
            self.engine_config = {}
        elif "build_config" in config:
            self.engine_config = config
            self.limits = _build.executor_limits(config, bool(kwargs.get("enable_chunked_prefill")))
        else:
            # ModelLoader._load_model_from_hf: the model class first, then the checkpoint's own quantization, which
            # converts with from_hugging_face without calibrating
            _build.get_trtllm_model_class(model)
            if not _build.update_from_hf_quant_config(model, kwargs.get("quant_config")):
                _build.load_hf_model(kwargs.get("quant_config"), kwargs.get("calib_config"))
            from tensorrt_llm.llmapi import BuildConfig

            build_config = kwargs.get("build_config") or BuildConfig()
            self.engine_config = _build.build(model, kwargs.get("quant_config"), build_config)

    def save(self, engine_dir: str) -> None:
        path = Path(engine_dir)
        path.mkdir(parents=True, exist_ok=True)
        # an engine's config.json carries its mapping (builder.py EngineConfig: pretrained_config.mapping), one
        # engine file per rank
        mapping = {"world_size": self.tp_size * self.pp_size, "tp_size": self.tp_size, "pp_size": self.pp_size}
        config = self.engine_config | {"fake_model": str(self.model), "pretrained_config": {"mapping": mapping}}
        (path / "config.json").write_text(json.dumps(config))
        for rank in range(mapping["world_size"]):
            (path / f"rank{rank}.engine").write_bytes(b"fake TensorRT engine")
        CALLS.append(("LLM.save", engine_dir))

    def shutdown(self) -> None:
        self.shut_down = True
        CALLS.append(("LLM.shutdown",))

    def generate_async(self, inputs, sampling_params=None, streaming=False, **kwargs):
        asyncio.get_running_loop()  # like TensorRT-LLM, a streaming result needs the running event loop
        from tensorrt_llm.llmapi import guide_for_executor

        _check_arguments(self.kwargs, sampling_params)
        # GenerationExecutor._maybe_initialize_iteration_results: stats flow again after each new request
        from tensorrt_llm.executor.result import IterationResult

        if self._stats is None:
            self._stats = IterationResult()
        else:
            self._stats.mark_undone()
        CALLS.append(("LLM.generate_async", list(inputs), sampling_params, streaming))
        # executor/worker.py _enqueue_request builds the C++ Request with these two
        request = {"end_id": _executor_end_id(sampling_params), "pad_id": sampling_params.pad_id}
        CALLS.append(("executor request", request))
        guide = guide_for_executor(getattr(sampling_params, "guided_decoding", None))
        error = _build.request_error(self.limits, len(inputs), getattr(sampling_params, "max_tokens", None))
        if guide is not None:
            CALLS.append(("executor guide", guide))
            if self.kwargs.get("guided_decoding_backend") is None:
                error = error or NO_GUIDED_DECODER
        return RequestOutput(next(_ids), list(inputs), sampling_params, error, llm=self)

    def get_stats(self, timeout: float) -> list[dict]:
        """GenerationExecutor.get_stats (see executor/result.py here)."""
        CALLS.append(("LLM.get_stats", timeout))
        if self._stats is None:
            return []
        self._stats.set_timeout(timeout)
        return self._stats.get_results()

    def get_stats_async(self, timeout: float):
        """GenerationExecutor.aget_stats: an async iterable of stats dicts."""
        from tensorrt_llm.executor.result import empty_async_iterable

        CALLS.append(("LLM.get_stats_async", timeout))
        if self._stats is None:
            return empty_async_iterable()
        self._stats.set_timeout(timeout)
        return self._stats


def _check_arguments(llm_kwargs: dict, params) -> None:
    """BaseLLM._check_arguments (llmapi/llm.py) on a TensorRT engine: logprobs need the LLM's own
    gather_generation_logits (an LLM argument, BaseLlmArgs in llmapi/llm_args.py); a logprobs of 0 is falsy and
    passes, and then returns no logprobs."""
    if params.logprobs and not llm_kwargs.get("gather_generation_logits"):
        raise ValueError(
            f"`sampling_params.logprobs={params.logprobs}` requires `gather_generation_logits=True` "
            "to be passed explicitly to the `LLM()` constructor."
        )


def _executor_end_id(params) -> int | None:
    """executor/worker.py _enqueue_request: `end_id=-1 if sampling_params.ignore_eos else sampling_params.end_id`
    (pad_id passes as is); the stop words stay."""
    return -1 if params.ignore_eos else params.end_id


def _check_speculation_fits_engine(model, speculative_config) -> None:
    """A TensorRT engine's speculative decoding mode is compiled in (BuildConfig.speculative_decoding_mode,
    tensorrt_llm/builder.py); an LLM given EagleDecodingConfig on an engine built without EAGLE cannot start its
    executor. The fake fails in the constructor; the real error's text is not reproduced."""
    from tensorrt_llm.llmapi import EagleDecodingConfig

    if not isinstance(speculative_config, EagleDecodingConfig):
        return
    config = Path(model) / "config.json"
    built = json.loads(config.read_text()).get("build_config", {}) if config.is_file() else {}
    if built.get("speculative_decoding_mode") != "EAGLE":
        raise RuntimeError(f"(fake) the engine in {model} was not built for EAGLE speculative decoding")


def _mapping(model: Path, kwargs: dict) -> tuple[int, int]:
    """(tp_size, pp_size) the LLM runs with. For a built engine, llmapi/llm_args.py
    BaseLlmArgs._load_config_from_engine (1.0) accepts a requested size of 1 or the engine's and takes the engine's;
    anything else raises. For a checkpoint, the requested split (the ranks it builds)."""
    tp, pp = kwargs.get("tensor_parallel_size", 1), kwargs.get("pipeline_parallel_size", 1)
    config = model / "config.json"
    engine = json.loads(config.read_text()).get("pretrained_config") if config.is_file() else None
    if engine is None:
        return tp, pp
    mapping = engine["mapping"]
    if tp not in (1, mapping["tp_size"]):
        raise ValueError(f"tp_size {tp} is not consistent with the engine's tp_size {mapping['tp_size']}")
    if pp not in (1, mapping["pp_size"]):
        raise ValueError(f"pp_size {pp} is not consistent with the engine's pp_size {mapping['pp_size']}")
    return mapping["tp_size"], mapping["pp_size"]


class RequestOutput:
    """One request's result: async-iterable while streaming; `outputs` are CompletionOutputs."""

    def __init__(
        self, request_id: int, prompt_token_ids: list[int], params, error: str | None = None, llm: LLM | None = None
    ):
        from tensorrt_llm.llmapi import CompletionOutput

        self._error = error  # the executor's error response: iterating raises RequestError, like the real result
        self._llm = llm

        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.finished = False
        self._aborted = False
        n = getattr(params, "n", 1)
        self.outputs = [CompletionOutput(index=i) for i in range(n)]
        self._plans = [self._plan(prompt_token_ids, i) for i in range(n)]

    def _plan(self, prompt: list[int], index: int) -> list[int]:
        if FAKE.script is not None:
            return list(FAKE.script)
        token = prompt[-1] + index
        walk = []
        for _ in range(getattr(self.params, "max_tokens", 32)):
            token = (token * 7 + 3) % 1000 + 10
            walk.append(token)
        return walk

    def abort(self) -> None:
        self._aborted = True
        CALLS.append(("RequestOutput.abort", self.request_id))

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.finished:
            raise StopAsyncIteration
        await asyncio.sleep(FAKE.step_seconds)
        if self._llm is not None and self._llm._stats is not None and FAKE.stats:
            self._llm._stats.put(FAKE.stats.pop(0))  # the executor's stats thread: one record per iteration
        if FAKE.fail_generation:
            if self._llm is not None:
                self._llm.shutdown()
            raise RuntimeError(FAKE.fail_generation)
        if FAKE.fail_request:
            self._error, FAKE.fail_request = FAKE.fail_request, None
        if self._error:
            from tensorrt_llm.executor import RequestError

            raise RequestError(self._error)
        p = self.params
        end_id = _executor_end_id(p)
        stops = set(getattr(p, "stop_token_ids", None) or [])
        for out, plan in zip(self.outputs, self._plans):
            out._last_token_ids_len = len(out.token_ids)
            out._last_logprobs_len = len(out.logprobs)
            if out.finish_reason:
                continue
            if self._aborted:
                out.finish_reason = "cancelled"
                continue
            for _ in range(FAKE.tokens_per_step):
                token = plan[len(out.token_ids)] if len(out.token_ids) < len(plan) else None
                if token is None or (end_id is not None and end_id >= 0 and token == end_id):
                    out.finish_reason = "stop" if token is not None else "length"
                    break
                if token in stops:  # the stop token is not part of the output, as without include_stop_str_in_output
                    out.finish_reason, out.stop_reason = "stop", token
                    break
                out.token_ids.append(token)
                if getattr(p, "logprobs", None):
                    from tensorrt_llm.llmapi import Logprob

                    entry = {token: Logprob(-0.25, 1)}
                    entry.update({token + r: Logprob(-0.25 * (r + 1), r + 1) for r in range(1, p.logprobs)})
                    out.logprobs.append(entry)
                if len(out.token_ids) >= getattr(p, "max_tokens", 32):
                    out.finish_reason = "length"
                    break
        self.finished = all(o.finish_reason for o in self.outputs)
        return self
