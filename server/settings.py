"""Server settings from CLI flags and `KILN_*` environment variables (flags win), via pydantic-settings."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ByteSize, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engines.build.manifest import is_engine_dir
from engines.config import MAX_SPECULATIVE_TOKENS, EngineConfig, Quantization


class ServerSettings(BaseSettings):
    """Every `kiln serve` setting, declared once: the CLI flags are generated from these fields (name ->
    --flag-name, description -> help; see server/cli.py), each can be set as KILN_<NAME>, and flags win over
    the environment. README's settings table and .env.example are checked against this list by a test.
    The order here is the order of `kiln serve --help`."""

    # frozen: settings are read by many parts of the server and never change once validated
    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore", protected_namespaces=(), frozen=True)

    # What to serve: a model or a built engine directory
    model: str | None = Field(
        None,
        description="Hugging Face model folder, .gguf file or hub id (default: the embedded SmolLM2-135M-Instruct)",
    )
    engine_dir: str | None = Field(
        None,
        description="engine directory written by `kiln build` (quantized weights, KV-cache dtype); not with --model",
    )
    backend: Literal["auto", "torch", "trtllm"] = Field(
        "auto",
        description="auto (the engine directory's: trtllm for TensorRT-LLM engines), torch or trtllm (default: auto)",
    )
    served_model_name: str | None = Field(
        None, description="model name clients send and /v1/models lists (default: the model's name)"
    )

    # HTTP
    host: str = Field("0.0.0.0", description="address to bind (default: 0.0.0.0)")
    port: int = Field(8000, ge=1, le=65535, description="port to bind (default: 8000)")
    api_key: str | None = Field(
        None, description="require 'Authorization: Bearer <key>' on /v1 (health and metrics stay open)"
    )
    # NoDecode: the variable is a comma-separated list, not the JSON pydantic-settings expects of a list.
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        [],
        description="comma-separated origins browsers may call the API from (CORS), e.g. "
        "https://app.example.com, or * for any (default: none, no CORS headers)",
    )

    # Engine (defaults are EngineConfig's)
    max_model_len: int | None = Field(None, description="context length (default: the model's, capped by the KV cache)")
    max_num_seqs: int = Field(EngineConfig.max_num_seqs, description="most sequences in a batch (default: 64)")
    max_num_batched_tokens: int | None = Field(
        EngineConfig.max_num_batched_tokens,
        description="token budget of one engine step (default: 512 on CPU, 2048 on CUDA)",
    )
    max_num_waiting: int = Field(
        EngineConfig.max_num_waiting,
        ge=1,
        description="most requests waiting for a batch slot; more get HTTP 429 (default: 1024)",
    )
    kv_cache_memory: ByteSize | None = Field(
        None, description="memory for the KV cache, e.g. 2GiB or 512MiB (default: 1 GiB on CPU)"
    )
    enable_prefix_caching: bool = Field(
        EngineConfig.enable_prefix_caching, description="reuse KV blocks of shared prompt prefixes (default: on)"
    )
    enforce_eager: bool = Field(
        EngineConfig.enforce_eager,
        description="CUDA: run decode steps op by op instead of replaying captured CUDA graphs (default: off)",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        EngineConfig.dtype, description="auto, float32, bfloat16 or float16 (default: auto)"
    )
    quantization: Quantization = Field(
        EngineConfig.quantization,
        description="quantize a model's weights as it loads: int8-wo (int8 weights, W8A16), gguf (a GGUF file's Q4_1 "
        "weights as stored, the rest int8-wo), none, or auto (on CPU when --dtype is auto: gguf for a .gguf model "
        "on an AVX-512 CPU, else int8-wo; else none); an engine directory keeps its build's (default: auto)",
    )
    block_size: int = Field(
        EngineConfig.block_size, description="tokens per KV-cache block, a power of two (default: 16)"
    )
    device: str = Field(EngineConfig.device, description="auto, cpu or cuda (default: auto)")

    # Speculative decoding (off unless a method is given)
    speculative_method: Literal["draft", "ngram"] | None = Field(
        None,
        description="speculative decoding: draft (a draft model proposes) or ngram (prompt lookup proposes; "
        "no model needed); torch backend only (default: off)",
    )
    speculative_draft: str | None = Field(
        None,
        description="the draft: an engine directory built with `kiln build "
        "--draft-of`, or a model folder with the same tokenizer (implies "
        "--speculative-method draft)",
    )
    num_speculative_tokens: int = Field(
        EngineConfig.num_speculative_tokens,
        ge=1,
        le=MAX_SPECULATIVE_TOKENS,
        description="tokens proposed per step, verified together by the model (default: 4)",
    )
    ngram_min: int = Field(
        EngineConfig.ngram_min, ge=1, description="shortest suffix the n-gram proposer looks up (default: 2)"
    )
    ngram_max: int = Field(
        EngineConfig.ngram_max, ge=1, description="longest suffix the n-gram proposer looks up (default: 4)"
    )

    # trtllm backend
    gpu_memory_fraction: float = Field(
        EngineConfig.gpu_memory_fraction,
        gt=0,
        le=1,
        description="trtllm: fraction of free GPU memory for the KV cache (default: 0.9)",
    )
    scheduler_policy: Literal["guaranteed_no_evict", "max_utilization"] = Field(
        EngineConfig.scheduler_policy,
        description="trtllm: guaranteed_no_evict or max_utilization (default: guaranteed_no_evict)",
    )
    tensor_parallel_size: int | None = Field(
        None,
        ge=1,
        description="trtllm: GPUs each layer is split across; must equal the engine's (default: the engine's, "
        "from engine.json)",
    )
    pipeline_parallel_size: int | None = Field(
        None,
        ge=1,
        description="trtllm: consecutive stages the layers are split into, one GPU each; must equal the engine's "
        "(default: the engine's, from engine.json)",
    )

    # Serving behaviour
    graceful_shutdown_timeout: float = Field(
        30.0,
        ge=0,
        description="seconds in-flight requests get to finish "
        "after SIGTERM; those still running then end with an error (default: "
        "30)",
    )
    max_request_body_bytes: int = Field(
        8 * 2**20,
        ge=1024,
        description="largest request body accepted; larger "
        "ones get HTTP 413 before they are read (default: 8388608, 8 MiB)",
    )
    sse_keepalive_seconds: float = Field(
        10.0,
        gt=0,
        description="seconds between SSE comments that keep a waiting stream alive through proxies (default: 10)",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="critical, error, warning, info or debug (default: info)"
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="text, or json: one JSON object per line (timestamp, level, logger, message, request_id) "
        "for kiln's and uvicorn's logs, the access log's included (default: text)",
    )
    otlp_traces_endpoint: str | None = Field(
        None,
        description="send one OpenTelemetry span per request to this OTLP collector, e.g. http://otel:4317 "
        "(gRPC; with OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf a URL ending in /v1/traces); needs "
        "the tracing extra (default: off)",
    )
    tool_call_parser: Literal["hermes", "llama3_json", "mistral"] | None = Field(
        None,
        description="the model's tool-call format for tool_choice auto: hermes, llama3_json or mistral "
        "(default: read from the chat template; Hermes when the template has no tool support)",
    )

    @field_validator(
        "api_key",
        "served_model_name",
        "model",
        "engine_dir",
        "speculative_method",
        "speculative_draft",
        "tool_call_parser",
        "otlp_traces_endpoint",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _origin_list(cls, value: Any) -> list[str]:
        if isinstance(value, str):
            value = [origin.strip() for origin in value.split(",") if origin.strip()]
        for origin in value:
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ValueError(
                    f"{origin!r} is not an origin: give * or scheme://host[:port] without a path, "
                    "e.g. https://app.example.com"
                )
        # Browsers send origins in lower case and CORSMiddleware compares them exactly.
        return [origin.lower() for origin in value]

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lowercase(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _draft_implies_method(cls, data: Any) -> Any:
        """A draft given is a draft to use (decided before validation: the settings are frozen after it)."""
        if isinstance(data, dict) and data.get("speculative_draft") and not data.get("speculative_method"):
            data = {**data, "speculative_method": "draft"}
        return data

    @model_validator(mode="after")
    def _check(self) -> ServerSettings:
        if self.model and self.engine_dir:
            raise ValueError("give --model or --engine-dir, not both")
        if self.engine_dir and not Path(self.engine_dir).expanduser().is_dir():
            raise ValueError(f"--engine-dir {self.engine_dir} is not a directory")
        if self.engine_dir and not is_engine_dir(self.engine_dir):
            raise ValueError(
                f"--engine-dir {self.engine_dir} is not a kiln engine directory (it has no engine.json); "
                "build one with `kiln build`, or serve a model folder with --model"
            )
        if self.model and not _plausible_model_source(self.model):
            raise ValueError(
                f"--model {self.model} does not exist (give a model folder, a .gguf file or a Hugging Face id)"
            )
        if self.speculative_draft and not Path(self.speculative_draft).expanduser().exists():
            raise ValueError(
                f"--speculative-draft {self.speculative_draft} does not exist (give an engine directory "
                "built with `kiln build --draft-of`, or a model folder)"
            )
        if self.backend == "trtllm" and not self.engine_dir:
            raise ValueError(
                "--backend trtllm serves an engine directory built with `kiln build --backend trtllm`; "
                "give --engine-dir"
            )
        if self.speculative_method == "draft" and not self.speculative_draft:
            raise ValueError(
                "--speculative-method draft needs --speculative-draft (an engine directory built with "
                "`kiln build --draft-of`, or a model folder)"
            )
        if (self.tensor_parallel_size or 1) * (self.pipeline_parallel_size or 1) > 1:
            from engines import select_backend
            from engines.parallel import TORCH_REFUSAL

            if select_backend(self.engine_config()) != "trtllm":
                raise ValueError(TORCH_REFUSAL.rstrip("."))
        if self.otlp_traces_endpoint:
            from server.tracing import check_available

            problem = check_available()
            if problem:
                raise ValueError(problem)
        self.engine_config().validate()
        return self

    @property
    def stream_grace_period(self) -> float:
        """How long a stream may run on after SIGTERM: a little less than uvicorn's own grace period."""
        return max(0.0, self.graceful_shutdown_timeout - 1.0)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            backend=self.backend,
            engine_dir=self.engine_dir,
            served_model_name=self.served_model_name,
            dtype=self.dtype,
            quantization=self.quantization,
            device=self.device,
            block_size=self.block_size,
            kv_cache_memory=int(self.kv_cache_memory) if self.kv_cache_memory is not None else None,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_waiting=self.max_num_waiting,
            enable_prefix_caching=self.enable_prefix_caching,
            enforce_eager=self.enforce_eager,
            speculative_method=self.speculative_method,
            speculative_draft=self.speculative_draft,
            num_speculative_tokens=self.num_speculative_tokens,
            ngram_min=self.ngram_min,
            ngram_max=self.ngram_max,
            gpu_memory_fraction=self.gpu_memory_fraction,
            scheduler_policy=self.scheduler_policy,
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
        )


_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s]+", re.IGNORECASE)


def _plausible_model_source(source: str) -> bool:
    """A path that exists, or something shaped like a hub id ("org/name")."""
    if Path(source).expanduser().exists():
        return True
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))
