"""Pre-quantized model folders for the tests of engines/torch/prequantized and of `kiln build` from them: a tiny
random Llama whose projections a writer of tests/prequant_writers.py quantizes, saved with its config and the default
model's tokenizer, and the greedy answers kiln serves from a folder or an engine directory."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engines.base import GenerationRequest, SamplingParams
from engines.config import EngineConfig
from engines.model_source import resolve_model
from engines.torch.loader import build_core, load_model
from tests.build_fixtures import tiny_llama_config

PROMPTS = [[1, 500, 600, 700, 800, 900], [1, 42, 4242, 31337, 7, 7, 7, 9000]]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

# (module, weight [N, K]) -> (the module's stored tensors by field, the dequantized float32 weight)
LinearWriter = Callable[[str, torch.Tensor], tuple[dict[str, torch.Tensor], torch.Tensor]]


def tiny_llama_state() -> dict[str, torch.Tensor]:
    """The float32 state dict of a 2-layer random Llama (grouped-query attention, untied head)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return {
        k: v.contiguous() for k, v in LlamaForCausalLM(tiny_llama_config(num_key_value_heads=2)).state_dict().items()
    }


def write_folder(path: Path, tensors: dict[str, torch.Tensor], quantization_config: dict | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_llama_config(num_key_value_heads=2)
    if quantization_config is not None:
        config.quantization_config = quantization_config
    config.save_pretrained(path)
    save_file(tensors, str(path / "model.safetensors"))
    default = resolve_model(None)
    for name in TOKENIZER_FILES:
        if (default / name).is_file():
            shutil.copy(default / name, path / name)
    return path


def write_pair(root: Path, state: dict[str, torch.Tensor], quantization_config: dict, linear: LinearWriter):
    """(the pre-quantized folder, a float folder holding the weights it dequantizes to). The decoder's projections
    are quantized; embeddings, norms and the LM head stay float as the tools leave them."""
    stored: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            module = name.removesuffix(".weight")
            fields, dequantized = linear(module, tensor)
            stored.update({f"{module}.{field}": t.contiguous() for field, t in fields.items()})
            reference[name] = dequantized.contiguous()
        else:
            stored[name] = reference[name] = tensor
    return write_folder(root / "quantized", stored, quantization_config), write_folder(
        root / "reference", reference, None
    )


def answers(
    config: EngineConfig, max_tokens: int = 32, kv_cache_dtype: str = "model"
) -> tuple[object, dict[str, list]]:
    """The loaded model (a folder or an engine directory, as `config` says) and, per prompt, `max_tokens` greedy
    tokens' TokenLogprobs."""
    loaded = load_model(config)
    core = build_core(EngineConfig(kv_cache_memory=16 << 20, kv_cache_dtype=kv_cache_dtype), loaded)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=1)
    for i, prompt in enumerate(PROMPTS):
        core.add_request(GenerationRequest(f"r{i}", prompt, params))
    out: dict[str, list] = {f"r{i}": [] for i in range(len(PROMPTS))}
    while core.has_work():
        for o in core.step():
            out[o.request_id].extend(o.outputs[0].new_logprobs)
    return loaded, out


def folder_answers(folder: Path) -> tuple[object, dict[str, list]]:
    """`kiln serve --model folder --dtype float32`'s 32 greedy tokens per prompt."""
    return answers(EngineConfig(model=str(folder), dtype="float32"))


def ct_config(fmt: str, weights: dict):
    """compressed-tensors' own QuantizationConfig, as llm-compressor saves it (lm_head ignored)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))
    config = QuantizationConfig(
        config_groups={"group_0": scheme}, format=fmt, ignore=["lm_head"], quantization_status="compressed"
    )
    return scheme, json.loads(config.model_dump_json()) | {"quant_method": "compressed-tensors"}


def write_fp8_static(root: Path, state: dict[str, torch.Tensor], kv_names: tuple[str, str] = ("k_scale", "v_scale")):
    """An llm-compressor FP8 checkpoint with static activation and KV-cache scales (compressed-tensors'
    QuantizationConfig with input_activations and kv_cache_scheme; each layer's scales under kv_names, relative to
    its self_attn) and its dequantized float folder. Returns (quantized, reference, the KV scales [layers, 2])."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    from tests import prequant_writers as writers

    static = QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False)
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=8, type="float", strategy="channel"),
        input_activations=static,
    )
    config = QuantizationConfig(
        config_groups={"group_0": scheme},
        format="float-quantized",
        ignore=["lm_head"],
        kv_cache_scheme=static,
        quantization_status="compressed",
    )
    ranges = writers.activation_ranges(state, tiny_llama_config(num_key_value_heads=2), PROMPTS)

    def linear(module: str, w: torch.Tensor):
        stored, dequantized = writers.compressed_tensors_linear(w, scheme, "float-quantized")
        return dict(stored) | {"input_scale": writers.static_fp8_scale(ranges[f"{module}.input"])}, dequantized

    quantized, reference = write_pair(root, state, json.loads(config.model_dump_json()), linear)
    layers = sorted({int(k.split(".")[2]) for k in ranges})
    kv = torch.stack(
        [torch.cat([writers.static_fp8_scale(ranges[f"model.layers.{i}.self_attn.{x}"]) for x in "kv"]) for i in layers]
    )
    extra = {}
    for i in layers:
        for j, name in enumerate(kv_names):
            extra[f"model.layers.{i}.self_attn.{name}"] = kv[i, j].reshape(1).clone()
    from safetensors.torch import load_file

    save_file(load_file(str(quantized / "model.safetensors")) | extra, str(quantized / "model.safetensors"))
    return quantized, reference, kv
