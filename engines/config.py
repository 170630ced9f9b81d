"""Settings of an engine instance, shared by the CLI, the server and tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

DType = Literal["auto", "float32", "bfloat16", "float16"]
SchedulerPolicy = Literal["guaranteed_no_evict", "max_utilization"]
KV_CACHE_DTYPES = ("model", "int8", "fp8")
SPECULATIVE_METHODS = ("draft", "ngram")  # the torch backend's; the trtllm backend refuses both
BACKENDS = ("auto", "torch", "trtllm")
# Weight quantization applied while a model folder loads (no calibration, so nothing to build first): auto, none,
# or a calibration-free scheme of engines/schemes (engines/torch/load_quantization.py decides what auto means).
# gguf: a GGUF file's Q4_1 projections as the file stores them (engines/torch/gguf_blocks.py), the rest int8-wo.
Quantization = Literal["auto", "none", "int8-wo", "gguf"]
QUANTIZATIONS: tuple[Quantization, ...] = ("auto", "none", "int8-wo", "gguf")
SCHEDULER_POLICIES = ("guaranteed_no_evict", "max_utilization")
MAX_SPECULATIVE_TOKENS = 16


# frozen: an engine is built from one config, and whatever resolves a setting later (an engine directory's
# KV-cache dtype, for one) returns the resolved value instead of writing it back into the caller's config
@dataclass(frozen=True)
class EngineConfig:
    # A Hugging Face model folder, a .gguf file, a hub id, or None for the embedded default model.
    model: str | None = None
    # auto: trtllm when the engine directory holds a TensorRT-LLM engine, else torch
    backend: str = "auto"
    # An engine directory written by `kiln build` (quantized weights, KV dtype and scales); not with model.
    engine_dir: str | None = None
    served_model_name: str | None = None
    dtype: DType = "auto"  # auto: bfloat16 (CPU with avx512_bf16 or CUDA), else float32
    # auto: on a CPU with kiln's int kernels when dtype is auto too, gguf for a GGUF file on AVX-512 and int8-wo
    # otherwise; else none (load_quantization.py)
    quantization: Quantization = "auto"
    device: str = "auto"  # auto: cuda when visible, else cpu
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes for the KV pool; None: 1 GiB on CPU, 90% of free on CUDA
    max_model_len: int | None = None  # None: the model's max_position_embeddings (capped by the pool)
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None  # token budget of one step; None: default_batched_tokens(device)
    enable_prefix_caching: bool = True
    max_num_waiting: int = 1024  # beyond this, generate() raises EngineOverloadedError
    num_threads: int | None = None  # torch intra-op threads on CPU; None keeps torch's default
    enforce_eager: bool = False  # CUDA: run decode steps op by op instead of replaying captured CUDA graphs
    kv_cache_dtype: str = "model"  # model: the model's dtype; int8 or fp8 (E4M3): half of bf16's bytes per token
    # static float32 [num_layers, 2 (k, v), num_kv_heads] from the build step's calibration (amax / 127 for int8,
    # amax / 448 for fp8); int8 needs them, fp8 without them uses 1.0
    kv_cache_scales: torch.Tensor | None = None
    # Speculative decoding: None (off), "draft" (a smaller or quantized engine of the same tokenizer proposes)
    # or "ngram" (prompt lookup: the continuation of the latest earlier match of the last tokens proposes).
    speculative_method: str | None = None
    speculative_draft: str | None = None  # the draft: an engine directory or a model folder (method "draft")
    num_speculative_tokens: int = 4  # tokens proposed per step; the target verifies k + 1 positions at once
    ngram_min: int = 2  # n-gram match window: the longest suffix of ngram_max .. ngram_min tokens is looked up
    ngram_max: int = 4
    # trtllm backend only: KvCacheConfig.free_gpu_memory_fraction and the in-flight batching scheduler policy
    gpu_memory_fraction: float = 0.9
    scheduler_policy: SchedulerPolicy = "guaranteed_no_evict"
    # trtllm backend only: the engine's GPU split, which serving may only confirm (None: the engine's, engine.json)
    tensor_parallel_size: int | None = None
    pipeline_parallel_size: int | None = None

    def validate(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}.")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}.")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}.")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}.")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}.")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}.")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}.")
        if self.engine_dir is not None and self.quantization not in ("auto", "none"):
            raise ValueError(
                f"quantization {self.quantization} applies to a model folder; an engine directory is served with "
                "the precision it was built with (kiln build --precision)."
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be model, int8 or fp8, got {self.kv_cache_dtype!r}.")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be auto, torch or trtllm, got {self.backend!r}.")
        if self.scheduler_policy not in SCHEDULER_POLICIES:
            raise ValueError(
                f"scheduler_policy must be guaranteed_no_evict or max_utilization, got {self.scheduler_policy!r}."
            )
        if not 0.0 < self.gpu_memory_fraction <= 1.0:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction}.")
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}.")
        self._validate_speculative()

    def _validate_speculative(self) -> None:
        method = self.speculative_method
        if method is None:
            if self.speculative_draft is not None:
                raise ValueError(
                    "speculative_draft is set but speculative_method is not; use speculative_method draft."
                )
            return
        if method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_method must be draft or ngram, got {method!r}.")
        if not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(
                f"num_speculative_tokens must be between 1 and {MAX_SPECULATIVE_TOKENS}, "
                f"got {self.num_speculative_tokens}."
            )
        if method == "ngram" and not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(
                f"the n-gram window needs 1 <= ngram_min <= ngram_max, got {self.ngram_min} and {self.ngram_max}."
            )


# A CPU prefills far slower than a GPU: a 2048-token step (vLLM's default) holds every running stream for most
# of a second and makes a burst of prompts wait for whole such steps. 512 on CPU halved TTFT p50 at concurrency 32
# at the same throughput, at the price of more frequent, shorter stalls (docs/performance.md, "Defaults").
DEFAULT_BATCHED_TOKENS = {"cpu": 512, "cuda": 2048}


def default_batched_tokens(device: torch.device) -> int:
    return DEFAULT_BATCHED_TOKENS.get(device.type, 2048)
