"""What `kiln build --backend trtllm` takes from a model folder before TensorRT-LLM 1.0 sees it: the model types its
TensorRT backend converts, and the pre-quantized checkpoints it reads itself (passed through, never quantized again).

kiln's LLM is tensorrt_llm._tensorrt_engine.LLM (the TensorRT backend). Its ModelLoader._load_model_from_hf
(tensorrt_llm/llmapi/llm_utils.py) does, in this order:

1. AutoModelForCausalLM.get_trtllm_model_class (tensorrt_llm/models/automodel.py): config.json's architectures[0]
   looked up in MODEL_MAP (tensorrt_llm/models/__init__.py); any other raises NotImplementedError("The given
   huggingface model architecture ... is not supported in TRT-LLM yet").
2. ModelLoader._update_from_hf_quant_config: NVIDIA ModelOpt's hf_quant_config.json, when present, sets the
   QuantConfig from its "quantization" section (quant_algo required: "Pre-quantized checkpoint must have quant_algo.";
   a quant_algo or kv_cache_quant_algo given besides it that differs raises ValueError "... conflicting with ... from
   HF quant config"; without a KV algorithm in the file only an FP8 or NVFP4 KV cache may be asked for). Otherwise
   config.json's quantization_config is read for quant_method "fp8" with weight_block_size (FP8_BLOCK_SCALES) and
   "mxfp4" only; any other raises NotImplementedError("Unsupported quantization_config: ..."): GPTQ, AWQ,
   compressed-tensors and per-tensor or per-channel FP8 configs among them.
3. A pre-quantized checkpoint converts with from_hugging_face, without calibration (`_requires_calibration and not
   prequantized`).

FP8_BLOCK_SCALES and the MXFP4 algorithms have layers only in the PyTorch backend (tensorrt_llm/_torch), not in the
TensorRT backend kiln builds with, so kiln passes ModelOpt checkpoints through and refuses the rest in one sentence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engines import schemes
from engines.trtllm.api import TrtllmUnsupported

# MODEL_MAP's decoder-only language models (tensorrt_llm/models/__init__.py; GEMMA*_ARCHITECTURE from
# models/gemma/config.py): config.json's architectures[0] -> its model_type
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mixtral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "PhiForCausalLM": "phi",
    "Phi3ForCausalLM": "phi3",
    "FalconForCausalLM": "falcon",
    "GPT2LMHeadModel": "gpt2",
    "GPTBigCodeForCausalLM": "gpt_bigcode",
    "Starcoder2ForCausalLM": "starcoder2",
    "GPTJForCausalLM": "gptj",
    "GPTNeoXForCausalLM": "gpt_neox",
    "BloomForCausalLM": "bloom",
    "OPTForCausalLM": "opt",
    "MptForCausalLM": "mpt",
    "InternLM2ForCausalLM": "internlm2",
    "GraniteForCausalLM": "granite",
    "GraniteMoeForCausalLM": "granitemoe",
    "CohereForCausalLM": "cohere",
    "NemotronForCausalLM": "nemotron",
    "ExaoneForCausalLM": "exaone",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DbrxForCausalLM": "dbrx",
    "BaichuanForCausalLM": "baichuan",
}
# ModelOpt's kv_cache_quant_algo -> kiln KV dtype (engines/trtllm/flows.py KV_ALGO, inverted)
KV_DTYPES = {None: "model", "FP8": "fp8", "INT8": "int8"}


def check_model_type(hf_config) -> None:
    """Refuse, in one sentence with the list, a model TensorRT-LLM 1.0's TensorRT backend does not convert."""
    arch = (getattr(hf_config, "architectures", None) or [None])[0]
    if arch not in ARCHITECTURES:
        raise TrtllmUnsupported(
            f"TensorRT-LLM 1.0 builds no {hf_config.model_type} models ({arch}); --backend trtllm takes the model "
            f"types {', '.join(sorted(set(ARCHITECTURES.values())))}; build it with --backend torch."
        )


@dataclass(frozen=True)
class PassThrough:
    """A ModelOpt checkpoint TensorRT-LLM reads itself: its QuantAlgo names and kiln's names for them."""

    quant_algo: str
    kv_cache_quant_algo: str | None
    precision: str  # the kiln scheme of that QuantAlgo
    kv_cache_dtype: str


def pass_through(folder: Path, hf_config) -> PassThrough | None:
    """The checkpoint's own quantization, as TensorRT-LLM 1.0 will read it; None for a float checkpoint. A format it
    cannot read is refused in one sentence."""
    modelopt = folder / "hf_quant_config.json"
    if modelopt.is_file():
        section = json.loads(modelopt.read_text()).get("quantization") or {}
        algo, kv = section.get("quant_algo"), section.get("kv_cache_quant_algo")
        precision = next((s.name for s in schemes.schemes() if s.trtllm and s.trtllm.quant_algo == algo), None)
        if algo is None or precision is None or kv not in KV_DTYPES:
            raise TrtllmUnsupported(
                f"{modelopt} says quant_algo {algo!r} and kv_cache_quant_algo {kv!r}; kiln passes ModelOpt "
                f"checkpoints of {', '.join(_passed_algos())} with an FP8, INT8 or no KV algorithm to TensorRT-LLM."
            )
        return PassThrough(algo, kv, precision, KV_DTYPES[kv])
    config = getattr(hf_config, "quantization_config", None)
    if config is None:
        return None
    config = config if isinstance(config, dict) else config.to_dict()
    method = config.get("quant_method")
    if method == "fp8" and config.get("weight_block_size"):
        why = "reads block-wise FP8 (FP8_BLOCK_SCALES) only in its PyTorch backend, not the TensorRT one kiln builds"
    elif method == "mxfp4":
        why = "reads MXFP4 only in its PyTorch backend, not the TensorRT one kiln builds"
    else:
        why = 'raises NotImplementedError("Unsupported quantization_config") for it'
    raise TrtllmUnsupported(
        f"TensorRT-LLM 1.0 cannot build this {method} checkpoint (config.json's quantization_config): its LLM API "
        f"{why} and reads pre-quantized weights from NVIDIA ModelOpt exports (hf_quant_config.json); build it with "
        "--backend torch, which serves it as stored."
    )


def _passed_algos() -> list[str]:
    return [s.trtllm.quant_algo for s in schemes.schemes() if s.trtllm and s.trtllm.quant_algo]
