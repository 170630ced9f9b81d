"""The scales an FP8 checkpoint stores beside its weights (engines/torch/prequantized): KV-cache scales under each
producer's names serve kiln's fp8 or int8 KV cache when one is asked for; static activation scales (input_scale) are
taken, logged and not applied; a scale of the wrong shape gets one sentence naming the tensor. The checkpoints are
llm-compressor's (compressed-tensors' QuantizationConfig with input_activations and kv_cache_scheme) and vLLM's
quant_method "fp8" with activation_scheme "static"."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from engines.config import EngineConfig
from engines.torch import prequantized
from engines.torch.loader import build_core, load_model
from tests.prequant_folders import PROMPTS, answers, tiny_llama_state, write_fp8_static

KV_HEADS = 2


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return tiny_llama_state()


@pytest.fixture(scope="module")
def fp8_static(state, tmp_path_factory):
    return write_fp8_static(tmp_path_factory.mktemp("fp8-static"), state)


def _read(folder):
    from transformers import AutoConfig

    return prequantized.read_prequantized(
        folder, AutoConfig.from_pretrained(folder), torch.float32, torch.device("cpu")
    )


def _kv_cache_scales(folder, kv_cache_dtype: str) -> torch.Tensor | None:
    loaded = load_model(EngineConfig(model=str(folder), dtype="float32"))
    core = build_core(EngineConfig(kv_cache_memory=4 << 20, kv_cache_dtype=kv_cache_dtype), loaded)
    return getattr(core.runner.kv_cache, "scales", None)


def test_the_checkpoints_kv_scales_serve_an_fp8_and_an_int8_kv_cache(fp8_static):
    quantized, _, kv = fp8_static
    per_head = kv[:, :, None].expand(-1, -1, KV_HEADS)  # one scale per layer, the same for each KV head
    assert torch.equal(_kv_cache_scales(quantized, "fp8"), per_head)
    # int8 keeps the checkpoint's clipping range (amax = scale * 448) over int8's codes
    assert torch.allclose(_kv_cache_scales(quantized, "int8"), per_head * 448 / 127)
    assert _kv_cache_scales(quantized, "model") is None


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "int8"])
def test_a_quantized_kv_cache_with_the_checkpoints_scales_stays_close_to_the_float_one(fp8_static, kv_cache_dtype):
    """The float-KV model's own greedy answers, read by both: the next-token distributions stay close (a scale
    convention read the wrong way round, amax * 448 instead of amax / 448, clips every key to nothing)."""
    from engines.build.evaluate import answer_rows
    from engines.build.prequantized import _accuracy

    quantized, _, _ = fp8_static
    _, float_kv = answers(EngineConfig(model=str(quantized), dtype="float32"), max_tokens=8)
    loaded = load_model(EngineConfig(model=str(quantized), dtype="float32"))
    scales = _kv_cache_scales(quantized, kv_cache_dtype)
    cpu = torch.device("cpu")
    replies = [[s.token_id for s in float_kv[f"r{i}"]] for i in range(2)]
    sequences = [p + a for p, a in zip(PROMPTS, replies)]
    rows = answer_rows(PROMPTS, replies)
    got = _accuracy(loaded.model, loaded.model, sequences, rows, replies, kv_cache_dtype, scales, torch.float32, cpu)
    assert got.kl_mean < 0.01 and got.top1_agreement >= 0.9, got


@pytest.mark.parametrize(
    "names",
    [
        ("k_scale", "v_scale"),  # llm-compressor, quant_method fp8
        ("k_proj.k_scale", "v_proj.v_scale"),  # NVIDIA ModelOpt
        ("k_proj.output_scale", "v_proj.output_scale"),  # older compressed-tensors
        ("kv_scale", "kv_scale"),  # AutoFP8's single scale
    ],
    ids=["self_attn", "modelopt", "output_scale", "kv_scale"],
)
def test_each_producers_kv_scale_names_are_read(state, tmp_path, names):
    quantized, _, kv = write_fp8_static(tmp_path, state, names)
    stored = _read(quantized)
    expected = kv[:, 1:].expand(-1, 2) if names[0] == "kv_scale" else kv  # the one scale written last (v's)
    assert torch.equal(stored.kv_scales, expected[:, :, None].expand(-1, -1, KV_HEADS))
    assert stored.kv_dtype == "fp8"


def test_vllm_fp8_static_checkpoint_keeps_its_kv_scales(fp8_static, tmp_path):
    """quant_method "fp8" with activation_scheme "static" (vLLM's Fp8Config) stores the same tensors."""
    quantized, _, kv = fp8_static
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for f in quantized.iterdir():
        if f.name != "config.json":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    assert torch.equal(_read(tmp_path).kv_scales, kv[:, :, None].expand(-1, -1, KV_HEADS))


def test_static_activation_scales_are_not_applied_and_say_so(fp8_static, caplog):
    quantized, _, _ = fp8_static
    with caplog.at_level(logging.INFO, logger="kiln.engine"):
        _read(quantized)
    assert "14 static activation scales (input_scale) are not applied" in caplog.text  # 7 projections x 2 layers


def _edited(folder, tmp_path, edit):
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(tmp_path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


K_SCALE = "model.layers.1.self_attn.k_scale"
INPUT_SCALE = "model.layers.0.mlp.down_proj.input_scale"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.update({K_SCALE: torch.ones(3)}),
            rf"{K_SCALE} has shape \[3\]; a KV-cache scale is one per layer \(\[\] or \[1\]\) or one per KV "
            r"head \(\[2\]\)",
        ),
        (
            lambda t: t.update({INPUT_SCALE: torch.ones(2)}),
            rf"{INPUT_SCALE} has shape \[2\]; a static activation scale is one per tensor",
        ),
        (lambda t: t.pop(K_SCALE), "has KV-cache scales for some layers but none for layer 1 k"),
    ],
    ids=["kv-scale-shape", "input-scale-shape", "kv-scale-missing"],
)
def test_a_malformed_scale_is_named(fp8_static, tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        _read(_edited(fp8_static[0], tmp_path, edit))
