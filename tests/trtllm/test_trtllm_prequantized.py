"""`kiln build --backend trtllm` of a pre-quantized checkpoint and of a model type TensorRT-LLM does not convert,
against the fake, which fails where TensorRT-LLM 1.0 fails: ModelLoader._load_model_from_hf (llmapi/llm_utils.py) asks
AutoModelForCausalLM.get_trtllm_model_class (models/automodel.py, MODEL_MAP of models/__init__.py) for the model
class, then ModelLoader._update_from_hf_quant_config reads ModelOpt's hf_quant_config.json (or config.json's
quantization_config, for block-wise FP8 and MXFP4 only) and converts a pre-quantized checkpoint uncalibrated. kiln
passes ModelOpt checkpoints through and refuses the rest in one sentence (engines/trtllm/checkpoints.py)."""

from __future__ import annotations

import json
import shutil

import pytest

from engines.build.builder import BuildError, build
from tests.trtllm.conftest import H100
from tests.trtllm.test_trtllm_build import B200, calls, options


def _copy(tiny_chat_folder, tmp_path, config_edit=None, hf_quant_config: dict | None = None):
    folder = tmp_path / "model"
    shutil.copytree(tiny_chat_folder, folder)
    if config_edit is not None:
        config = json.loads((folder / "config.json").read_text())
        config_edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    if hf_quant_config is not None:  # what ModelOpt's export_hf_checkpoint writes beside the weights
        (folder / "hf_quant_config.json").write_text(
            json.dumps({"producer": {"name": "modelopt", "version": "0.33.0"}, "quantization": hf_quant_config})
        )
    return folder


def _algos(fake) -> dict:
    (quant,) = calls(fake, "QuantConfig")
    return {k: getattr(v, "name", v) for k, v in quant.items()}


@pytest.mark.parametrize(
    ("quantization", "precision", "kv"),
    [
        ({"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}, "fp8", "fp8"),
        ({"quant_algo": "W4A16_AWQ", "group_size": 128, "has_zero_point": False}, "int4-awq", "model"),
        ({"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16}, "nvfp4", "fp8"),
    ],
    ids=["fp8", "int4-awq", "nvfp4"],
)
def test_a_modelopt_checkpoint_is_passed_through_uncalibrated(
    fake_trtllm, tiny_chat_folder, tmp_path, quantization, precision, kv
):
    folder = _copy(tiny_chat_folder, tmp_path, hf_quant_config=quantization)
    result = build(options(folder, tmp_path / "engine"), B200 if precision == "nvfp4" else H100)
    assert (result.manifest.precision, result.manifest.kv_cache_dtype) == (precision, kv)
    assert calls(fake_trtllm, "CalibConfig") == []  # nothing is calibrated: the weights are the checkpoint's
    # the QuantConfig kiln gives is the checkpoint's own, which TensorRT-LLM reads again without a conflict
    expected = {"quant_algo": quantization["quant_algo"]}
    if "kv_cache_quant_algo" in quantization:
        expected["kv_cache_quant_algo"] = quantization["kv_cache_quant_algo"]
    assert _algos(fake_trtllm) == expected
    assert calls(fake_trtllm, "hf_quant_config") == [
        {"quant_algo": quantization["quant_algo"], "kv_cache_quant_algo": quantization.get("kv_cache_quant_algo")}
    ]


def test_an_fp8_kv_cache_may_be_added_to_a_checkpoint_without_one(fake_trtllm, tiny_chat_folder, tmp_path):
    folder = _copy(tiny_chat_folder, tmp_path, hf_quant_config={"quant_algo": "FP8"})
    result = build(options(folder, tmp_path / "engine", kv_cache_dtype="fp8"), H100)
    assert result.manifest.kv_cache_dtype == "fp8"
    assert _algos(fake_trtllm) == {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}


def test_the_fake_refuses_what_tensorrt_llm_refuses(fake_trtllm, tiny_chat_folder, tmp_path):
    """What kiln's own refusals stand in front of, raised by the fake as TensorRT-LLM 1.0 raises it."""
    from tensorrt_llm._tensorrt_engine import LLM
    from tensorrt_llm.llmapi import QuantAlgo, QuantConfig

    gptq = _copy(tiny_chat_folder, tmp_path / "gptq", lambda c: c.update(quantization_config={"quant_method": "gptq"}))
    with pytest.raises(NotImplementedError, match="Unsupported quantization_config"):
        LLM(str(gptq))
    olmo = _copy(tiny_chat_folder, tmp_path / "olmo", lambda c: c.update(architectures=["Olmo2ForCausalLM"]))
    with pytest.raises(NotImplementedError, match="architecture Olmo2ForCausalLM is not supported in TRT-LLM yet"):
        LLM(str(olmo))
    fp8 = _copy(tiny_chat_folder, tmp_path / "fp8", hf_quant_config={"quant_algo": "FP8"})
    with pytest.raises(ValueError, match="conflicting with quant_algo=QuantAlgo.FP8 from HF quant config"):
        LLM(str(fp8), quant_config=QuantConfig(quant_algo=QuantAlgo.W4A16_AWQ))
    with pytest.raises(ValueError, match="Only kv_cache_quant_algo=QuantAlgo.FP8 or QuantAlgo.NVFP4 is allowed"):
        LLM(str(fp8), quant_config=QuantConfig(kv_cache_quant_algo=QuantAlgo.INT8))


@pytest.mark.parametrize(
    ("quantization_config", "message"),
    [
        (
            {"quant_method": "gptq", "bits": 4, "group_size": 128},
            r"cannot build this gptq checkpoint .* raises NotImplementedError\(\"Unsupported quantization_config\"\)",
        ),
        ({"quant_method": "awq", "bits": 4, "version": "gemm"}, "cannot build this awq checkpoint"),
        ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, "this compressed-tensors checkpoint"),
        ({"quant_method": "fp8", "activation_scheme": "static"}, "cannot build this fp8 checkpoint"),
        (
            {"quant_method": "fp8", "weight_block_size": [128, 128]},
            "reads block-wise FP8 .* only in its PyTorch backend",
        ),
    ],
    ids=["gptq", "awq", "compressed-tensors", "fp8-per-tensor", "fp8-block"],
)
def test_a_format_tensorrt_llm_cannot_read_is_refused_in_one_sentence(
    fake_trtllm, tiny_chat_folder, tmp_path, quantization_config, message
):
    folder = _copy(tiny_chat_folder, tmp_path, lambda c: c.update(quantization_config=quantization_config))
    with pytest.raises(BuildError, match=message) as info:
        build(options(folder, tmp_path / "engine"), H100)
    assert "\n" not in str(info.value) and "--backend torch" in str(info.value)
    assert calls(fake_trtllm, "LLM") == []


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(precision="int4-awq"), r"already quantized \(FP8, kiln's fp8\) .* leave --precision at auto or fp8"),
        (dict(kv_cache_dtype="int8"), "--kv-cache-dtype int8 would conflict with it"),
    ],
)
def test_another_precision_or_kv_dtype_is_refused(fake_trtllm, tiny_chat_folder, tmp_path, kw, message):
    folder = _copy(tiny_chat_folder, tmp_path, hf_quant_config={"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"})
    with pytest.raises(BuildError, match=message):
        build(options(folder, tmp_path / "engine", **kw), H100)


def test_a_modelopt_algorithm_kiln_does_not_name_is_refused(fake_trtllm, tiny_chat_folder, tmp_path):
    folder = _copy(tiny_chat_folder, tmp_path, hf_quant_config={"quant_algo": "W4A8_AWQ"})
    with pytest.raises(BuildError, match=r"hf_quant_config.json says quant_algo 'W4A8_AWQ'"):
        build(options(folder, tmp_path / "engine"), H100)


def test_a_model_type_tensorrt_llm_does_not_convert_gets_the_list(fake_trtllm, tiny_chat_folder, tmp_path):
    folder = _copy(
        tiny_chat_folder, tmp_path, lambda c: c.update(architectures=["Olmo2ForCausalLM"], model_type="olmo2")
    )
    with pytest.raises(BuildError, match=r"builds no olmo2 models \(Olmo2ForCausalLM\); .* model types .*llama, ") as e:
        build(options(folder, tmp_path / "engine"), H100)
    assert "qwen3" in str(e.value) and "\n" not in str(e.value)
    assert calls(fake_trtllm, "LLM") == []
