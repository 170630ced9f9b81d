"""What the fake LLM does when it builds an engine from a Hugging Face folder, and the limits the executor of a built
engine applies, each failing where TensorRT-LLM 1.0 fails (the functions named below are the real ones mirrored).

Build: ModelLoader._load_model_from_hf (llmapi/llm_utils.py) picks the quantization flow, then builder.build compiles
with the BuildConfig as builder.py leaves it. Serve: _TrtLLM._build_model hands the engine's limits to the C++
executor (TrtGptModel, TrtGptModelInflightBatching), and BaseLLM._check_arguments plus LlmRequest::validate check each
request.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NoReturn

from tensorrt_llm._fake import CALLS

# QuantConfig._requires_modelopt_quantization (models/modeling_utils.py)
MODELOPT_ALGOS = {"NVFP4", "FP8", "W4A16_AWQ", "W4A8_AWQ", "W8A8_SQ_PER_CHANNEL", "MIXED_PRECISION"}
# QuantConfig._requires_calibration: all of QUANT_ALGO_LIST but these (quantization/mode.py), or a KV quantization
UNCALIBRATED_ALGOS = {None, "W8A16", "W4A16", "FP8_PER_CHANNEL_PER_TOKEN"}
KV_CACHE_QUANT_ALGOS = {"INT8", "FP8", "NVFP4"}
# quantization/mode.py W8A8_SQ_PLUGIN_LIST: what convert.quantize calls smooth quant (QuantConfig._use_plugin_sq)
W8A8_SQ_PLUGIN_ALGOS = {
    "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
    "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN",
    "W8A8_SQ_PER_TENSOR_PLUGIN",
}
# builder.py BuildConfig's defaults for the fields kiln may leave out
BUILD_CONFIG_DEFAULTS = {
    "max_input_len": 1024,
    "max_seq_len": None,
    "opt_batch_size": 8,
    "max_batch_size": 2048,
    "max_beam_width": 1,
    "max_num_tokens": 8192,
    "opt_num_tokens": None,
    "gather_context_logits": False,
    "gather_generation_logits": False,
}


@dataclass
class PluginConfig:
    """plugin/plugin.py PluginConfig: the defaults that decide the sequence limits of a 1.0 engine."""

    context_fmha: bool = True
    remove_input_padding: bool = True
    paged_kv_cache: bool = True
    use_paged_context_fmha: bool = True
    use_fp8_context_fmha: bool = True
    tokens_per_block: int = 32


def _name(algo) -> str | None:
    return getattr(algo, "name", algo)


def load_hf_model(quant_config, calib_config) -> str:
    """ModelLoader._load_model_from_hf: the flow a QuantConfig takes; returns its name or raises what it raises."""
    algo = _name(getattr(quant_config, "quant_algo", None))
    kv = _name(getattr(quant_config, "kv_cache_quant_algo", None))
    if algo in UNCALIBRATED_ALGOS and kv not in KV_CACHE_QUANT_ALGOS:
        return "from_hugging_face"
    dataset = getattr(calib_config, "calib_dataset", "cnn_dailymail")
    if algo in MODELOPT_ALGOS or (algo is None and kv == "FP8"):
        CALLS.append(("calibration dataset", _modelopt_calib_rows(dataset)))
        return "modelopt"
    # models/llama/convert.py quantize (LLaMAForCausalLM.quantize's non-ModelOpt branch)
    assert algo in W8A8_SQ_PLUGIN_ALGOS or kv == "INT8", "Call from_hugging_face when there is no quantization"
    _legacy_load_calib_dataset(dataset)


def _modelopt_calib_rows(dataset: str) -> list[dict]:
    """quantize_by_modelopt.py get_calib_dataloader: a local folder is `load_dataset(dir, split="train")["text"]`."""
    folder = Path(dataset)
    if not folder.is_dir():
        raise NotImplementedError(f"Unsupported dataset name or local repo directory: {dataset}.")
    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    for row in rows:
        row["text"]  # noqa: B018 (KeyError 'text' like the dataset's column lookup)
    return rows


def _legacy_load_calib_dataset(dataset: str) -> NoReturn:
    """models/convert_utils.py load_calib_dataset: split and column are known only for cnn_dailymail and lambada, so a
    local folder loads as a DatasetDict and `dataset[None]` raises datasets' KeyError."""
    splits = sorted(p.stem for p in Path(dataset).glob("*.jsonl"))
    raise KeyError(
        f"Invalid key: None. Please first select a split. For example: `my_dataset_dictionary['{splits[0]}'][None]`. "
        f"Available splits: {splits}"
    )


def build(model_dir: str, quant_config, build_config) -> dict:
    """builder.py build() with _init_max_seq_len and check_max_num_tokens: the build_config the engine's config.json
    records."""
    hf = json.loads((Path(model_dir) / "config.json").read_text())
    config = {key: getattr(build_config, key) for key in BUILD_CONFIG_DEFAULTS}
    plugins = replace(build_config.plugin_config)  # build() works on a deep copy
    if config["max_seq_len"] is None:
        config["max_seq_len"] = hf.get("max_position_embeddings") or 2048
    config["max_input_len"] = min(config["max_input_len"], config["max_seq_len"])
    config["max_num_tokens"] = min(config["max_num_tokens"], config["max_seq_len"] * config["max_batch_size"])
    algo = _name(getattr(quant_config, "quant_algo", None))
    kv = _name(getattr(quant_config, "kv_cache_quant_algo", None))
    if kv == "FP8" and algo not in {"FP8", "W4A8_AWQ", "NVFP4"}:
        plugins.use_paged_context_fmha = False  # "FP8 Paged Context FMHA is disabled because FP8 context FMHA is ..."
    if kv == "INT8":
        plugins.use_paged_context_fmha = False  # "Paged Context FMHA is disabled because it doesn't work with int8 ..."
    return {"build_config": config | {"plugin_config": asdict(plugins)}}


@dataclass
class ExecutorLimits:
    max_seq_len: int
    max_input_len: int
    chunked_context: bool


def executor_limits(engine_config: dict, enable_chunked_prefill: bool) -> ExecutorLimits:
    """TrtGptModel's maxInputLen, and TrtGptModelInflightBatching's refusal of chunked context without paged context
    FMHA (raised when the LLM creates its executor)."""
    config = engine_config["build_config"]
    plugins = config["plugin_config"]
    if enable_chunked_prefill and not plugins["use_paged_context_fmha"]:
        raise RuntimeError(
            "[TensorRT-LLM][ERROR] Assertion failed: Chunked context requires context FMHA, paged kv_cache and paged "
            "context FMHA all enabled at the same time."
        )
    max_seq_len = config["max_seq_len"]
    if enable_chunked_prefill:
        max_input_len = max_seq_len - 1
    elif plugins["context_fmha"] and plugins["remove_input_padding"]:
        max_input_len = min(max_seq_len - 1, config["max_num_tokens"])
    else:
        max_input_len = config["max_input_len"]
    return ExecutorLimits(max_seq_len, max_input_len, enable_chunked_prefill)


def request_error(limits: ExecutorLimits | None, prompt_len: int, max_tokens: int | None) -> str | None:
    """BaseLLM._check_arguments raises at once; LlmRequest::validate's error becomes the request's error response."""
    if limits is None:
        return None
    if not limits.chunked_context and prompt_len + (max_tokens or 0) > limits.max_seq_len:
        raise ValueError(
            f"The sum of prompt length ({prompt_len / 1}) and query length (0) max_tokens ({max_tokens}) should not "
            f"exceed max_seq_len ({limits.max_seq_len})"
        )
    if prompt_len > limits.max_input_len:
        return (
            "Encountered an error when fetching new request: [TensorRT-LLM][ERROR] Prompt length "
            f"({prompt_len}) exceeds maximum input length ({limits.max_input_len}). Set log level to info and check "
            "TRTGptModel logs for how maximum input length is set"
        )
    return None


# models/__init__.py MODEL_MAP: the Hugging Face architectures the TensorRT backend converts (its decoder-only language
# models; the encoders, diffusion and multimodal entries are left out of the fake)
MODEL_MAP = frozenset(
    {
        "GPT2LMHeadModel", "GPTBigCodeForCausalLM", "Starcoder2ForCausalLM", "NemotronForCausalLM", "OPTForCausalLM",
        "BloomForCausalLM", "FalconForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM", "GPTNeoXForCausalLM",
        "GPTJForCausalLM", "MptForCausalLM", "LlamaForCausalLM", "ExaoneForCausalLM", "MistralForCausalLM",
        "MixtralForCausalLM", "InternLM2ForCausalLM", "GraniteForCausalLM", "GraniteMoeForCausalLM",
        "BaichuanForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Qwen2ForCausalLM",
        "Qwen2MoeForCausalLM", "Qwen3ForCausalLM", "DbrxForCausalLM", "DeepseekV2ForCausalLM", "CohereForCausalLM",
    }
)  # fmt: skip


def get_trtllm_model_class(model_dir: str) -> str:
    """models/automodel.py AutoModelForCausalLM.get_trtllm_model_class: config.json's architectures[0] in MODEL_MAP."""
    hf = json.loads((Path(model_dir) / "config.json").read_text())
    arch = (hf.get("architectures") or [None])[0]
    if arch not in MODEL_MAP:
        raise NotImplementedError(f"The given huggingface model architecture {arch} is not supported in TRT-LLM yet")
    return arch


def update_from_hf_quant_config(model_dir: str, quant_config) -> bool:
    """llmapi/llm_utils.py ModelLoader._update_from_hf_quant_config (1.0): ModelOpt's hf_quant_config.json sets the
    QuantConfig; else config.json's quantization_config is read for block-wise FP8 and MXFP4 only. Returns whether
    the checkpoint is pre-quantized (so from_hugging_face converts it, uncalibrated)."""
    from tensorrt_llm.llmapi import QuantAlgo

    folder = Path(model_dir)
    if (folder / "hf_quant_config.json").is_file():
        section = json.loads((folder / "hf_quant_config.json").read_text())["quantization"]
        algo = section.pop("quant_algo", None)
        if algo is None:
            raise ValueError("Pre-quantized checkpoint must have quant_algo.")
        algo = QuantAlgo(algo)  # ValueError for a name QuantAlgo lacks
        if getattr(quant_config, "quant_algo", None) not in (None, algo):
            raise ValueError(
                f"Specified quant_algo={quant_config.quant_algo}, conflicting with quant_algo={algo} from HF quant "
                "config."
            )
        kv = section.pop("kv_cache_quant_algo", None)
        specified_kv = getattr(quant_config, "kv_cache_quant_algo", None)
        if kv is not None and specified_kv not in (None, QuantAlgo(kv)):
            raise ValueError(
                f"Specified kv_cache_quant_algo={specified_kv}, conflicting with kv_cache_quant_algo={QuantAlgo(kv)} "
                "from HF quant config."
            )
        if kv is None and _name(specified_kv) not in (None, "FP8", "NVFP4"):
            raise ValueError(
                "Only kv_cache_quant_algo=QuantAlgo.FP8 or QuantAlgo.NVFP4 is allowed for pre-quantized checkpoint, "
                f"got {specified_kv}."
            )
        CALLS.append(("hf_quant_config", {"quant_algo": algo.name, "kv_cache_quant_algo": kv}))
        return True
    hf_quant_config = json.loads((folder / "config.json").read_text()).get("quantization_config")
    if hf_quant_config is None:
        return False
    if hf_quant_config.get("quant_method") == "fp8" and hf_quant_config.get("weight_block_size"):
        return True  # FP8_BLOCK_SCALES
    if hf_quant_config.get("quant_method") == "mxfp4":
        return True
    raise NotImplementedError(f"Unsupported quantization_config: {hf_quant_config}.")
