"""Server settings from CLI flags and `KILN_*` environment variables (flags win), via pydantic-settings."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import ByteSize, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engines.build.manifest import is_engine_dir
from engines.config import MAX_SPECULATIVE_TOKENS, EngineConfig


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore", protected_namespaces=())

    # What to serve: a model (folder, .gguf, hub id; default: the embedded model) or a built engine directory.
    model: str | None = None
    backend: Literal["auto", "torch", "trtllm"] = "auto"
    engine_dir: str | None = None
    served_model_name: str | None = None

    # HTTP
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    api_key: str | None = None
    # CORS: origins browsers may call the API from ("*": any); none sends no CORS headers.
    # NoDecode: the variable is a comma-separated list, not the JSON pydantic-settings expects of a list.
    allowed_origins: Annotated[list[str], NoDecode] = []
    graceful_shutdown_timeout: float = Field(30.0, ge=0)
    max_request_body_bytes: int = Field(8 * 2**20, ge=1024)
    sse_keepalive_seconds: float = Field(10.0, gt=0)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    # tool_choice auto: the model's tool-call format (default: from the chat template; Hermes without one)
    tool_call_parser: Literal["hermes", "llama3_json", "mistral"] | None = None

    # Engine (defaults are EngineConfig's)
    max_model_len: int | None = None
    max_num_seqs: int = EngineConfig.max_num_seqs
    max_num_batched_tokens: int | None = EngineConfig.max_num_batched_tokens
    max_num_waiting: int = Field(EngineConfig.max_num_waiting, ge=1)
    kv_cache_memory: ByteSize | None = None
    enable_prefix_caching: bool = EngineConfig.enable_prefix_caching
    enforce_eager: bool = EngineConfig.enforce_eager
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = EngineConfig.dtype
    block_size: int = EngineConfig.block_size
    device: str = EngineConfig.device

    # Speculative decoding (off unless a method is given)
    speculative_method: Literal["draft", "ngram", "eagle"] | None = None
    speculative_draft: str | None = None
    num_speculative_tokens: int = Field(EngineConfig.num_speculative_tokens, ge=1, le=MAX_SPECULATIVE_TOKENS)
    ngram_min: int = Field(EngineConfig.ngram_min, ge=1)
    ngram_max: int = Field(EngineConfig.ngram_max, ge=1)

    # trtllm backend
    gpu_memory_fraction: float = Field(EngineConfig.gpu_memory_fraction, gt=0, le=1)
    scheduler_policy: Literal["guaranteed_no_evict", "max_utilization"] = EngineConfig.scheduler_policy

    @field_validator("api_key", "served_model_name", "model", "engine_dir", "speculative_method", "speculative_draft",
                     "tool_call_parser", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _origin_list(cls, value):
        if isinstance(value, str):
            value = [origin.strip() for origin in value.split(",") if origin.strip()]
        for origin in value:
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ValueError(f"{origin!r} is not an origin: give * or scheme://host[:port] without a path, "
                                 "e.g. https://app.example.com")
        # Browsers send origins in lower case and CORSMiddleware compares them exactly.
        return [origin.lower() for origin in value]

    @field_validator("log_level", mode="before")
    @classmethod
    def _lowercase(cls, value):
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> "ServerSettings":
        if self.model and self.engine_dir:
            raise ValueError("give --model or --engine-dir, not both")
        if self.engine_dir and not Path(self.engine_dir).expanduser().is_dir():
            raise ValueError(f"--engine-dir {self.engine_dir} is not a directory")
        if self.engine_dir and not is_engine_dir(self.engine_dir):
            raise ValueError(f"--engine-dir {self.engine_dir} is not a kiln engine directory (it has no engine.json); "
                             "build one with `kiln build`, or serve a model folder with --model")
        if self.model and not _plausible_model_source(self.model):
            raise ValueError(
                f"--model {self.model} does not exist (give a model folder, a .gguf file or a Hugging Face id)"
            )
        if self.speculative_draft and not Path(self.speculative_draft).expanduser().exists():
            raise ValueError(f"--speculative-draft {self.speculative_draft} does not exist (give an engine directory "
                             "built with `kiln build --draft-of`, or a model folder)")
        if self.speculative_draft and self.speculative_method is None:
            self.speculative_method = "draft"  # a draft given is a draft to use
        if self.backend == "trtllm" and not self.engine_dir:
            raise ValueError("--backend trtllm serves an engine directory built with `kiln build --backend trtllm`; "
                             "give --engine-dir")
        if self.speculative_method == "draft" and not self.speculative_draft:
            raise ValueError("--speculative-method draft needs --speculative-draft (an engine directory built with "
                             "`kiln build --draft-of`, or a model folder)")
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
        )


_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s]+", re.IGNORECASE)


def _plausible_model_source(source: str) -> bool:
    """A path that exists, or something shaped like a hub id ("org/name")."""
    if Path(source).expanduser().exists():
        return True
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))
