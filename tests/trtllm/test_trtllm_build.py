"""`kiln build --backend trtllm` against the recording fake of tensorrt_llm: every precision becomes the
exact QuantConfig / CalibConfig / BuildConfig kiln documents, the engine directory has kiln's manifest
beside TensorRT-LLM's engine, and unsupported hardware or precisions fail in one sentence."""

from __future__ import annotations

import json
import sys

import pytest

from engines.build import manifest as mf
from engines.build.builder import BuildError, BuildOptions, build
from engines.hardware import Hardware
from tests.trtllm.conftest import A100, CPU, H100, T4


def options(folder, out, **kw) -> BuildOptions:
    return BuildOptions(
        **({"model": str(folder), "output": str(out), "backend": "trtllm", "calib_samples": 16, "progress": False} | kw)
    )


def calls(fake, name):
    return [args[0] if args else None for (kind, *args) in fake.CALLS if kind == name]


# precision -> (QuantConfig kwargs by enum name, calibrated?) with the KV cache given explicitly
EXPECTED = {
    "bf16": ({}, False),
    "fp8": ({"quant_algo": "FP8"}, True),
    "int8-sq": ({"quant_algo": "W8A8_SQ_PER_CHANNEL", "smoothquant_val": 0.5}, True),
    "int8-wo": ({"quant_algo": "W8A16"}, False),
    "int4-rtn": ({"quant_algo": "W4A16", "group_size": 128}, False),
    "int4-awq": ({"quant_algo": "W4A16_AWQ", "group_size": 128}, True),
    "int4-gptq": ({"quant_algo": "W4A16_GPTQ", "group_size": 128}, True),
}


def _names(kwargs: dict) -> dict:
    return {k: getattr(v, "name", v) for k, v in kwargs.items()}


@pytest.mark.parametrize("precision", list(EXPECTED))
@pytest.mark.parametrize("kv", ["model", "int8", "fp8"])
def test_every_profile_maps_to_the_exact_trtllm_configs(fake_trtllm, tiny_chat_folder, tmp_path, precision, kv):
    out = tmp_path / "engine"
    result = build(options(tiny_chat_folder, out, precision=precision, kv_cache_dtype=kv), H100)
    quant, calibrated = EXPECTED[precision]
    kv_algo = {"model": {}, "int8": {"kv_cache_quant_algo": "INT8"}, "fp8": {"kv_cache_quant_algo": "FP8"}}[kv]
    assert [_names(c) for c in calls(fake_trtllm, "QuantConfig")] == [quant | kv_algo]
    assert calls(fake_trtllm, "BuildConfig") == [{"max_batch_size": 64, "max_num_tokens": 8192, "max_seq_len": 2048}]
    calib = calls(fake_trtllm, "CalibConfig")
    if calibrated or kv != "model":
        kwargs = calib[0]
        assert (
            kwargs["calib_batches"] == 16 and kwargs["calib_batch_size"] == 1 and kwargs["calib_max_seq_length"] == 512
        )
        dataset = calls(fake_trtllm, "calibration dataset")[0]
        assert len(dataset) == 16 and all(row["text"].startswith("<|im_start|>") for row in dataset)  # chat template
    else:
        assert calib == []
    llm_kwargs = calls(fake_trtllm, "LLM")[0]
    assert llm_kwargs["model"] == str(tiny_chat_folder) and llm_kwargs["tokenizer"] == str(tiny_chat_folder)
    assert set(llm_kwargs) == {"model", "tokenizer", "quant_config", "build_config"} | (
        {"calib_config"} if calib else set()
    )
    assert calls(fake_trtllm, "LLM.save")[0].endswith("/trtllm") and calls(fake_trtllm, "LLM.shutdown") == [None]

    m = result.manifest
    assert (m.backend, m.precision, m.kv_cache_dtype) == ("trtllm", precision, kv)
    min_sm = max(89 if precision == "fp8" else 80, {"model": 0, "int8": 80, "fp8": 89}[kv])
    assert m.target.requires == mf.Requirements(device="cuda", min_sm=min_sm)
    assert {"trtllm/rank0.engine", "trtllm/config.json", "tokenizer.json", "config.json"} <= set(m.files)
    assert mf.load_manifest(out) == m  # every file's checksum verifies
    assert not (out / "calibration").exists() and not list(tmp_path.glob("engine.tmp*"))


def test_auto_picks_fp8_on_hopper_and_int8_smoothquant_on_ampere(fake_trtllm, tiny_chat_folder, tmp_path):
    assert build(options(tiny_chat_folder, tmp_path / "h", precision="auto"), H100).manifest.precision == "fp8"
    assert build(options(tiny_chat_folder, tmp_path / "h", precision="auto"), H100).manifest.kv_cache_dtype == "fp8"
    ampere = build(options(tiny_chat_folder, tmp_path / "a", precision="auto"), A100).manifest
    assert (ampere.precision, ampere.kv_cache_dtype) == ("int8-sq", "int8")


def test_nvfp4_builds_for_blackwell_only_through_trtllm(fake_trtllm, tiny_chat_folder, tmp_path):
    b200 = Hardware(device="cuda", name="NVIDIA B200", memory_bytes=180 << 30, sm=100)
    m = build(options(tiny_chat_folder, tmp_path / "e", precision="nvfp4", kv_cache_dtype="fp8"), b200).manifest
    assert [_names(c) for c in calls(fake_trtllm, "QuantConfig")] == [
        {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8"}
    ]
    assert len(calls(fake_trtllm, "CalibConfig")) == 1
    assert (m.precision, m.target.requires) == ("nvfp4", mf.Requirements(device="cuda", min_sm=100))


@pytest.mark.parametrize(
    "hardware, kw, message",
    [
        (
            A100,
            dict(precision="fp8"),
            "fp8 needs a GPU with SM >= 89 in TensorRT-LLM, and NVIDIA A100-SXM4-80GB is SM 80",
        ),
        (A100, dict(precision="int8-sq", kv_cache_dtype="fp8"), "an fp8 KV cache needs a GPU with SM >= 89"),
        (T4, dict(precision="int4-awq"), "int4-awq needs a GPU with SM >= 80"),
        (T4, dict(precision="auto"), "need a GPU with SM >= 80 and Tesla T4 is SM 75"),
        (H100, dict(precision="fp32"), "'fp32' is not one of them"),
        (
            H100,
            dict(precision="nvfp4"),
            "nvfp4 needs a GPU with SM >= 100 in TensorRT-LLM, and NVIDIA H100 80GB HBM3 is SM 90",
        ),
        (CPU, dict(precision="fp8"), "builds on an NVIDIA GPU and torch sees none"),
    ],
)
def test_unsupported_hardware_or_precision_is_one_sentence(
    fake_trtllm, tiny_chat_folder, tmp_path, hardware, kw, message
):
    with pytest.raises(BuildError, match=message.replace("(", r"\(")) as info:
        build(options(tiny_chat_folder, tmp_path / "e", **kw), hardware)
    assert "\n" not in str(info.value)
    assert calls(fake_trtllm, "LLM") == []  # nothing was built


def test_without_tensorrt_llm_the_build_says_what_is_missing(tiny_chat_folder, tmp_path):
    assert "tensorrt_llm" not in sys.modules
    with pytest.raises(BuildError, match="needs the tensorrt_llm package"):
        build(options(tiny_chat_folder, tmp_path / "e", precision="fp8"), H100)


def test_kiln_imports_no_tensorrt_llm_at_module_load():
    import engines.trtllm.build  # noqa: F401
    import engines.trtllm.configs  # noqa: F401
    import engines.trtllm.engine  # noqa: F401
    import server.app  # noqa: F401

    assert not [m for m in sys.modules if m.startswith("tensorrt_llm")]


def test_the_user_calibration_set_is_what_tensorrt_llm_calibrates_on(fake_trtllm, tiny_chat_folder, tmp_path):
    calib = tmp_path / "mine.jsonl"
    calib.write_text(
        "\n".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}"}]}) for i in range(20))
    )
    result = build(options(tiny_chat_folder, tmp_path / "e", precision="int4-awq", calib=str(calib)), H100)
    dataset = calls(fake_trtllm, "calibration dataset")[0]
    assert len(dataset) == 16 and all("question" in row["text"] for row in dataset)
    assert result.manifest.calibration.source == str(calib)


def test_same_inputs_reuse_the_engine_and_other_inputs_rebuild(fake_trtllm, tiny_chat_folder, tmp_path):
    out = tmp_path / "e"
    first = build(options(tiny_chat_folder, out, precision="int8-wo"), H100)
    again = build(options(tiny_chat_folder, out, precision="int8-wo"), H100)
    assert not first.reused and again.reused and again.manifest.build_hash == first.manifest.build_hash
    assert len(calls(fake_trtllm, "LLM")) == 1  # the second call built nothing
    other_gpu = build(options(tiny_chat_folder, out, precision="int8-wo"), A100)
    forced = build(options(tiny_chat_folder, out, precision="int8-wo", force=True), A100)
    assert not other_gpu.reused and not forced.reused and len(calls(fake_trtllm, "LLM")) == 3


def test_the_manifest_records_real_config_objects_as_json():
    """TensorRT-LLM's BuildConfig is a dataclass holding a PluginConfig object and enums: the manifest
    keeps enums by name and other objects as text."""
    import enum
    from dataclasses import dataclass, field

    from engines.trtllm.build import _describe

    class Kind(enum.Enum):
        PAGED = 1

    class PluginConfig:
        def __str__(self):
            return "PluginConfig(paged_kv_cache=True)"

    @dataclass
    class BuildConfig:
        max_batch_size: int = 64
        kv_cache_type: Kind = Kind.PAGED
        plugin_config: PluginConfig = field(default_factory=PluginConfig)
        lora_target_modules: list = field(default_factory=lambda: [Kind.PAGED])

    described = _describe(BuildConfig())
    assert json.loads(json.dumps(described)) == {
        "max_batch_size": 64,
        "kv_cache_type": "PAGED",
        "plugin_config": "PluginConfig(paged_kv_cache=True)",
        "lora_target_modules": ["PAGED"],
    }
