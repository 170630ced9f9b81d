"""The one place kiln imports tensorrt_llm (lazily), and the hardware rules of its support matrix."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from engines import schemes
from engines.schemes import TrtllmMapping


class TrtllmUnavailable(RuntimeError):
    """tensorrt_llm (or a GPU for it) is missing; the message says what to do."""


class TrtllmUnsupported(ValueError):
    """A precision, KV dtype, GPU or option TensorRT-LLM cannot take; the message names it."""


@dataclass
class TrtllmApi:
    llm_class: type  # tensorrt_llm._tensorrt_engine.LLM: builds and runs TensorRT engines
    llmapi: ModuleType  # tensorrt_llm.llmapi: QuantConfig, ..., KvCacheConfig, SamplingParams, GuidedDecodingParams
    version: str
    # tensorrt_llm.executor.RequestError: what a result raises when the executor failed that one request
    request_error: type[Exception]


def load() -> TrtllmApi:
    try:
        import tensorrt_llm
        from tensorrt_llm import llmapi
        from tensorrt_llm._tensorrt_engine import LLM
        from tensorrt_llm.executor import RequestError
    except ImportError as exc:
        raise TrtllmUnavailable(
            f"the trtllm backend needs the tensorrt_llm package ({exc}); run kiln in the TensorRT-LLM image "
            "(docker/Dockerfile.trtllm) on an NVIDIA GPU, or use --backend torch."
        ) from exc
    return TrtllmApi(LLM, llmapi, getattr(tensorrt_llm, "__version__", "unknown"), RequestError)


# TensorRT-LLM's support matrix (docs/source/reference/support-matrix.md) for the KV cache: an INT8 cache
# needs Ampere, an FP8 cache Ada or Hopper. Each precision's minimum SM is its scheme's (engines/schemes).
KV_MIN_SM = {"model": 0, "int8": 80, "fp8": 89}


def min_sm(precision: str, kv_cache_dtype: str) -> int:
    """The SM a TensorRT-LLM engine of this precision and KV dtype needs."""
    return max(trtllm_mapping(precision).min_sm, KV_MIN_SM.get(kv_cache_dtype, 0))


def trtllm_mapping(precision: str) -> TrtllmMapping:
    """How TensorRT-LLM builds `precision` (its scheme's mapping); TrtllmUnsupported if it does not."""
    found = schemes.get(precision).trtllm if precision in schemes.names() else None
    if found is None:
        raise TrtllmUnsupported(
            f"TensorRT-LLM engines are built at {', '.join(schemes.trtllm_names())}; "
            f"{precision!r} is not one of them (use --backend torch)."
        )
    return found


def check_gpu(precision: str, kv_cache_dtype: str, sm: int | None, gpu_name: str) -> None:
    """Raise TrtllmUnsupported in one sentence when this GPU cannot run the combination."""
    weights_sm = trtllm_mapping(precision).min_sm
    if sm is None:
        raise TrtllmUnavailable("the trtllm backend needs an NVIDIA GPU and torch sees none; use --backend torch.")
    need = min_sm(precision, kv_cache_dtype)
    if sm < need:
        what = precision if weights_sm >= KV_MIN_SM.get(kv_cache_dtype, 0) else f"an {kv_cache_dtype} KV cache"
        raise TrtllmUnsupported(f"{what} needs a GPU with SM >= {need} in TensorRT-LLM, and {gpu_name} is SM {sm}.")
