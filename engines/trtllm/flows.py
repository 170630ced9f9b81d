"""Which quantization flow TensorRT-LLM 1.0 takes for a kiln precision and KV dtype, and which pairs it can build.

`LLM(model=HF_FOLDER, quant_config=..., calib_config=...)` picks the flow in ModelLoader._load_model_from_hf
(tensorrt_llm/llmapi/llm_utils.py): without `QuantConfig._requires_calibration` the model converts with
`from_hugging_face` (weight-only INT8/INT4 quantize as they load, per channel); otherwise `model_cls.quantize`, which
for Llama (models/llama/model.py LLaMAForCausalLM.quantize) goes to

- ModelOpt (PretrainedModel.quantize -> quantization/quantize_by_modelopt.py quantize_and_export) when
  `QuantConfig._requires_modelopt_quantization` (models/modeling_utils.py): FP8, W4A16_AWQ, W4A8_AWQ,
  W8A8_SQ_PER_CHANNEL, NVFP4, MIXED_PRECISION, or no weight quantization with an FP8 KV cache. Its
  get_calib_dataloader reads a local folder as `load_dataset(dir, split="train")["text"]`: kiln's train.jsonl works.
- the legacy converter (models/llama/convert.py quantize) for everything else that calibrates. It asserts
  `use_smooth_quant or int8_kv_cache, "Call from_hugging_face when there is no quantization"` (smooth quant there means
  the W8A8_SQ_*_PLUGIN algorithms, which kiln does not use), then loads the calibration set with
  models/convert_utils.py load_calib_dataset, whose `load_dataset(dir, name=None, split=None)[None]` raises KeyError for
  any local folder (it knows split and column names only for cnn_dailymail and lambada). So no kiln build works there.

GPTQ (W4A16_GPTQ) calibrates, so it too lands in the legacy converter, which has no GPTQ: TensorRT-LLM reads GPTQ
weights only from a checkpoint already quantized with GPTQ (load_weights_from_hf_gptq_model).
"""

from __future__ import annotations

import enum

from engines import schemes
from engines.trtllm.api import KV_MIN_SM, trtllm_mapping

# kiln KV dtype -> QuantAlgo member name of the KV cache (tensorrt_llm/quantization/mode.py)
KV_ALGO = {"model": None, "int8": "INT8", "fp8": "FP8"}
# QuantConfig._requires_modelopt_quantization (models/modeling_utils.py)
MODELOPT_ALGOS = frozenset({"NVFP4", "FP8", "W4A16_AWQ", "W4A8_AWQ", "W8A8_SQ_PER_CHANNEL", "MIXED_PRECISION"})
# QuantConfig._requires_calibration: every QuantAlgo but these, or any KV cache quantization
UNCALIBRATED_ALGOS = frozenset({None, "W8A16", "W4A16", "FP8_PER_CHANNEL_PER_TOKEN"})
GPTQ_ALGOS = frozenset({"W4A16_GPTQ", "W8A16_GPTQ"})
# The KV dtypes `--kv-cache-dtype auto` tries for an explicit precision, best first.
KV_PREFERENCE = ("fp8", "int8", "model")


class Flow(enum.Enum):
    FROM_HUGGING_FACE = "from_hugging_face"  # no calibration
    MODELOPT = "ModelOpt"  # quantize_and_export, calibrated on kiln's set
    LEGACY = "legacy convert.quantize"  # fails for every kiln build (module docstring)


def route(quant_algo: str | None, kv_algo: str | None) -> Flow:
    """The flow ModelLoader._load_model_from_hf takes for QuantConfig(quant_algo, kv_cache_quant_algo)."""
    if quant_algo in UNCALIBRATED_ALGOS and kv_algo is None:
        return Flow.FROM_HUGGING_FACE
    if quant_algo in MODELOPT_ALGOS or (quant_algo is None and kv_algo == "FP8"):
        return Flow.MODELOPT
    return Flow.LEGACY


def flow(precision: str, kv_cache_dtype: str) -> Flow:
    return route(trtllm_mapping(precision).quant_algo, KV_ALGO[kv_cache_dtype])


def builds(precision: str, kv_cache_dtype: str) -> bool:
    return flow(precision, kv_cache_dtype) is not Flow.LEGACY


def kv_that_builds(precision: str) -> tuple[str, ...]:
    return tuple(kv for kv in KV_PREFERENCE if builds(precision, kv))


def default_kv(precision: str, sm: int) -> str | None:
    """The best KV dtype this GPU runs that TensorRT-LLM builds with `precision` (None: none does)."""
    return next((kv for kv in kv_that_builds(precision) if sm >= KV_MIN_SM[kv]), None)


def refusal(precision: str, kv_cache_dtype: str) -> str | None:
    """Why TensorRT-LLM 1.0 cannot build this pair from float weights, in one sentence that says what builds
    instead; None when it can."""
    if builds(precision, kv_cache_dtype):
        return None
    if trtllm_mapping(precision).quant_algo in GPTQ_ALGOS:
        return (
            f"TensorRT-LLM builds {precision} only from a checkpoint already quantized with GPTQ, not from float "
            "weights; build int4-awq (calibrated INT4 weights) instead."
        )
    kv_phrase = "no KV cache quantization" if kv_cache_dtype == "model" else f"an {kv_cache_dtype} KV cache"
    why = (
        "its legacy converter cannot load a local calibration set (KeyError in load_calib_dataset)"
        if _passes_legacy_assertion(precision, kv_cache_dtype)
        else 'its legacy converter asserts "Call from_hugging_face when there is no quantization"'
    )
    others = [p for p in schemes.trtllm_names() if p != precision and builds(p, kv_cache_dtype)]
    instead = [f"{precision} with --kv-cache-dtype {' or '.join(kv_that_builds(precision))}"]
    if others:
        instead.append(f"{', '.join(others[:-1])} or {others[-1]} with {kv_phrase}" if len(others) > 1 else others[0])
    return f"TensorRT-LLM 1.0 cannot build {precision} weights with {kv_phrase}: {why}; build {', or '.join(instead)}."


def _passes_legacy_assertion(precision: str, kv_cache_dtype: str) -> bool:
    """convert.quantize's `assert use_smooth_quant or int8_kv_cache`: smooth quant there is QuantConfig._use_plugin_sq,
    the W8A8_SQ_*_PLUGIN algorithms (quantization/mode.py W8A8_SQ_PLUGIN_LIST)."""
    algo = trtllm_mapping(precision).quant_algo or ""
    return (algo.startswith("W8A8_SQ") and algo.endswith("_PLUGIN")) or KV_ALGO[kv_cache_dtype] == "INT8"
