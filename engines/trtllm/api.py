"""The one place kiln imports tensorrt_llm (lazily), and the hardware rules of its support matrix."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType


class TrtllmUnavailable(RuntimeError):
    """tensorrt_llm (or a GPU for it) is missing; the message says what to do."""


class TrtllmUnsupported(ValueError):
    """A precision, KV dtype, GPU or option TensorRT-LLM cannot take; the message names it."""


@dataclass
class TrtllmApi:
    llm_class: type  # tensorrt_llm._tensorrt_engine.LLM: builds and runs TensorRT engines
    llmapi: ModuleType  # tensorrt_llm.llmapi: QuantConfig, ..., KvCacheConfig, SamplingParams, GuidedDecodingParams
    version: str


def load() -> TrtllmApi:
    try:
        import tensorrt_llm
        from tensorrt_llm import llmapi
        from tensorrt_llm._tensorrt_engine import LLM
    except ImportError as exc:
        raise TrtllmUnavailable(
            f"the trtllm backend needs the tensorrt_llm package ({exc}); run kiln in the TensorRT-LLM image "
            "(docker/Dockerfile.trtllm) on an NVIDIA GPU, or use --backend torch.") from exc
    return TrtllmApi(LLM, llmapi, getattr(tensorrt_llm, "__version__", "unknown"))


def is_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt_llm") is not None


# TensorRT-LLM's support matrix (docs/source/reference/support-matrix.md): FP8 needs Ada or Hopper and
# later (SM >= 89); INT8 SmoothQuant, INT8/INT4 weight-only, AWQ and GPTQ need Ampere or later (SM >= 80);
# NVFP4 needs Blackwell (SM >= 100). bf16 engines need SM >= 80 for bf16 math.
MIN_SM = {"bf16": 80, "fp8": 89, "int8-sq": 80, "int8-wo": 80, "int4-rtn": 80, "int4-awq": 80, "int4-gptq": 80,
          "nvfp4": 100}
KV_MIN_SM = {"model": 0, "int8": 80, "fp8": 89}


def check_gpu(precision: str, kv_cache_dtype: str, sm: int | None, gpu_name: str) -> None:
    """Raise TrtllmUnsupported in one sentence when this GPU cannot run the combination."""
    if precision not in MIN_SM:
        raise TrtllmUnsupported(f"TensorRT-LLM engines are built at {', '.join(MIN_SM)}; {precision!r} is not one "
                                "of them (use --backend torch).")
    if sm is None:
        raise TrtllmUnavailable("the trtllm backend needs an NVIDIA GPU and torch sees none; use --backend torch.")
    need = max(MIN_SM[precision], KV_MIN_SM.get(kv_cache_dtype, 0))
    if sm < need:
        what = precision if MIN_SM[precision] >= KV_MIN_SM.get(kv_cache_dtype, 0) else f"an {kv_cache_dtype} KV cache"
        raise TrtllmUnsupported(f"{what} needs a GPU with SM >= {need} in TensorRT-LLM, and {gpu_name} is SM {sm}.")
