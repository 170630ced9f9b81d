"""`kiln build --backend trtllm` against the recording fake of tensorrt_llm: every precision becomes the
exact QuantConfig / CalibConfig / BuildConfig kiln documents, the engine directory has kiln's manifest
beside TensorRT-LLM's engine, and unsupported hardware or precisions fail in one sentence."""

from __future__ import annotations

import json
import re
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


# precision -> QuantConfig kwargs by enum name (the KV cache's added per test). No smoothquant_val for int8-sq (the
# ModelOpt flow ignores it) and no group_size for int4-rtn (TensorRT-LLM's W4A16 is per channel).
QUANT = {
    "bf16": {},
    "fp8": {"quant_algo": "FP8"},
    "int8-sq": {"quant_algo": "W8A8_SQ_PER_CHANNEL"},
    "int8-wo": {"quant_algo": "W8A16"},
    "int4-rtn": {"quant_algo": "W4A16"},
    "int4-awq": {"quant_algo": "W4A16_AWQ", "group_size": 128},
    "int4-gptq": {"quant_algo": "W4A16_GPTQ", "group_size": 128},
    "nvfp4": {"quant_algo": "NVFP4"},
}
B200 = Hardware(device="cuda", name="NVIDIA B200", memory_bytes=180 << 30, sm=100)
MODELOPT, FROM_HF = "modelopt", "from_hugging_face"
ASSERTS = 'asserts "Call from_hugging_face when there is no quantization"'
NO_LOCAL_SET = "cannot load a local calibration set"
GPTQ = "only from a checkpoint already quantized with GPTQ, not from float weights; build int4-awq"
# (precision, KV) -> the flow TensorRT-LLM 1.0 takes (engines/trtllm/flows.py docstring), or what kiln's refusal says
FLOWS = {
    ("bf16", "model"): FROM_HF,
    ("bf16", "int8"): NO_LOCAL_SET,
    ("bf16", "fp8"): MODELOPT,
    ("fp8", "model"): MODELOPT,
    ("fp8", "int8"): MODELOPT,
    ("fp8", "fp8"): MODELOPT,
    ("int8-sq", "model"): MODELOPT,
    ("int8-sq", "int8"): MODELOPT,
    ("int8-sq", "fp8"): MODELOPT,
    ("int8-wo", "model"): FROM_HF,
    ("int8-wo", "int8"): NO_LOCAL_SET,
    ("int8-wo", "fp8"): ASSERTS,
    ("int4-rtn", "model"): FROM_HF,
    ("int4-rtn", "int8"): NO_LOCAL_SET,
    ("int4-rtn", "fp8"): ASSERTS,
    ("int4-awq", "model"): MODELOPT,
    ("int4-awq", "int8"): MODELOPT,
    ("int4-awq", "fp8"): MODELOPT,
    ("int4-gptq", "model"): GPTQ,
    ("int4-gptq", "int8"): GPTQ,
    ("int4-gptq", "fp8"): GPTQ,
    ("nvfp4", "model"): MODELOPT,
    ("nvfp4", "int8"): MODELOPT,
    ("nvfp4", "fp8"): MODELOPT,
}
# builder.build keeps paged context FMHA, which chunked prefill needs, without KV quantization or with an FP8 KV cache
# and FP8/NVFP4 weights
CHUNKED = {pair for pair in FLOWS if pair[1] == "model" or (pair[1] == "fp8" and pair[0] in ("fp8", "nvfp4"))}


def _names(kwargs: dict) -> dict:
    return {k: getattr(v, "name", v) for k, v in kwargs.items()}


@pytest.mark.parametrize("precision, kv", list(FLOWS))
def test_every_pair_builds_through_its_real_flow_or_is_refused_before_the_build(
    fake_trtllm, tiny_chat_folder, tmp_path, precision, kv
):
    out = tmp_path / "engine"
    gpu = B200 if precision == "nvfp4" else H100
    flow = FLOWS[(precision, kv)]
    if flow not in (MODELOPT, FROM_HF):
        with pytest.raises(BuildError, match=re.escape(flow)) as info:
            build(options(tiny_chat_folder, out, precision=precision, kv_cache_dtype=kv), gpu)
        assert "\n" not in str(info.value) and "build " in str(info.value)  # one sentence saying what builds instead
        assert calls(fake_trtllm, "LLM") == []  # refused before any model load
        return
    result = build(options(tiny_chat_folder, out, precision=precision, kv_cache_dtype=kv), gpu)
    kv_algo = {"model": {}, "int8": {"kv_cache_quant_algo": "INT8"}, "fp8": {"kv_cache_quant_algo": "FP8"}}[kv]
    assert [_names(c) for c in calls(fake_trtllm, "QuantConfig")] == [QUANT[precision] | kv_algo]
    assert calls(fake_trtllm, "BuildConfig") == [
        {
            "max_batch_size": 64,
            "max_num_tokens": 8192,
            "max_seq_len": 2048,
            "max_input_len": 2047,
            "gather_generation_logits": False,
        }
    ]
    calib = calls(fake_trtllm, "CalibConfig")
    if flow == MODELOPT:
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
    assert (m.backend, m.precision, m.kv_cache_dtype, m.max_model_len) == ("trtllm", precision, kv, 2048)
    min_sm = max({"fp8": 89, "nvfp4": 100}.get(precision, 80), {"model": 0, "int8": 80, "fp8": 89}[kv])
    assert m.target.requires == mf.Requirements(device="cuda", min_sm=min_sm)
    assert (m.trtllm.max_batch_size, m.trtllm.max_seq_len, m.trtllm.max_num_tokens) == (64, 2048, 8192)
    assert (m.trtllm.max_input_len, m.trtllm.chunked_prefill) == (2047, (precision, kv) in CHUNKED)
    assert m.trtllm.gather_generation_logits is False
    assert {"trtllm/rank0.engine", "trtllm/config.json", "tokenizer.json", "config.json"} <= set(m.files)
    assert mf.load_manifest(out) == m  # every file's checksum verifies
    assert not (out / "calibration").exists() and not list(tmp_path.glob("engine.tmp*"))


@pytest.mark.parametrize(
    "quant, kv, error, message",
    [
        ("W8A16", "FP8", AssertionError, "Call from_hugging_face when there is no quantization"),
        ("W4A16", "FP8", AssertionError, "Call from_hugging_face when there is no quantization"),
        ("W4A16_GPTQ", None, AssertionError, "Call from_hugging_face when there is no quantization"),
        (None, "INT8", KeyError, "Invalid key: None. Please first select a split"),
        ("W8A16", "INT8", KeyError, "Invalid key: None. Please first select a split"),
    ],
)
def test_the_fake_fails_where_tensorrt_llm_1_0_fails_to_quantize(
    fake_trtllm, tiny_chat_folder, tmp_path, quant, kv, error, message
):
    """What an LLM built with these QuantConfigs does in TensorRT-LLM 1.0 (the legacy llama/convert.py flow), so the
    refusals above stand for real failures."""
    from tensorrt_llm.llmapi import LLM, BuildConfig, CalibConfig, QuantAlgo, QuantConfig

    dataset = tmp_path / "calibration"
    dataset.mkdir()
    (dataset / "train.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    quant_config = QuantConfig(
        **({"quant_algo": QuantAlgo[quant]} if quant else {}), **({"kv_cache_quant_algo": QuantAlgo[kv]} if kv else {})
    )
    with pytest.raises(error, match=re.escape(message)):
        LLM(
            model=str(tiny_chat_folder),
            quant_config=quant_config,
            calib_config=CalibConfig(calib_dataset=str(dataset)),
            build_config=BuildConfig(),
        )


def test_a_kv_cache_left_to_auto_is_one_that_builds_with_the_precision(fake_trtllm, tiny_chat_folder, tmp_path):
    """int8-wo or bf16 with the GPU's KV default (FP8 on Hopper, INT8 on Ampere) would fail in TensorRT-LLM: an
    explicit precision gets the best KV dtype that builds with it."""

    def kv(precision, gpu, name):
        return build(options(tiny_chat_folder, tmp_path / name, precision=precision), gpu).manifest.kv_cache_dtype

    assert kv("int8-wo", H100, "a") == "model" and kv("int4-rtn", A100, "b") == "model"
    assert kv("bf16", A100, "c") == "model" and kv("bf16", H100, "d") == "fp8"
    assert kv("int4-awq", A100, "e") == "int8" and kv("int8-sq", H100, "f") == "fp8"


def test_int4_rtn_refuses_a_group_size_tensorrt_llm_would_ignore(fake_trtllm, tiny_chat_folder, tmp_path):
    with pytest.raises(BuildError, match="--group-size does not apply to int4-rtn on the trtllm backend"):
        build(options(tiny_chat_folder, tmp_path / "e", precision="int4-rtn", group_size=64), H100)
    assert calls(fake_trtllm, "LLM") == []
    awq = build(options(tiny_chat_folder, tmp_path / "f", precision="int4-awq", group_size=64), H100)
    assert _names(calls(fake_trtllm, "QuantConfig")[0])["group_size"] == 64 and awq.manifest.precision == "int4-awq"


def test_gather_logits_builds_for_logprobs_and_is_part_of_the_build(fake_trtllm, tiny_chat_folder, tmp_path):
    out = tmp_path / "e"
    plain = build(options(tiny_chat_folder, out, precision="fp8"), H100)
    gathered = build(options(tiny_chat_folder, out, precision="fp8", gather_logits=True), H100)
    assert not gathered.reused and gathered.manifest.build_hash != plain.manifest.build_hash
    assert calls(fake_trtllm, "BuildConfig")[-1]["gather_generation_logits"] is True
    assert gathered.manifest.trtllm.gather_generation_logits is True
    assert plain.manifest.trtllm.gather_generation_logits is False
    with pytest.raises(BuildError, match="--gather-logits applies to --backend trtllm"):
        build(BuildOptions(model=str(tiny_chat_folder), output=str(tmp_path / "t"), gather_logits=True))


def test_kiln_build_has_the_gather_logits_flag():
    import argparse

    from engines.cli import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["build", "--output", "x", "--backend", "trtllm", "--gather-logits"])
    assert args.gather_logits is True
    assert parser.parse_args(["build", "--output", "x"]).gather_logits is False


def test_auto_picks_fp8_on_hopper_and_int8_smoothquant_on_ampere(fake_trtllm, tiny_chat_folder, tmp_path):
    assert build(options(tiny_chat_folder, tmp_path / "h", precision="auto"), H100).manifest.precision == "fp8"
    assert build(options(tiny_chat_folder, tmp_path / "h", precision="auto"), H100).manifest.kv_cache_dtype == "fp8"
    ampere = build(options(tiny_chat_folder, tmp_path / "a", precision="auto"), A100).manifest
    assert (ampere.precision, ampere.kv_cache_dtype) == ("int8-sq", "int8")
    # Ampere's default goes through ModelOpt (calibrated on kiln's set) and, with its INT8 KV cache, without chunked
    # prefill (builder.build drops paged context FMHA for INT8 KV)
    assert calls(fake_trtllm, "calibration dataset") and not ampere.trtllm.chunked_prefill


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
    # a pair TensorRT-LLM cannot build is refused as such, with or without tensorrt_llm installed
    with pytest.raises(BuildError, match="cannot build int8-wo weights with an fp8 KV cache"):
        build(options(tiny_chat_folder, tmp_path / "e", precision="int8-wo", kv_cache_dtype="fp8"), H100)


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


@pytest.mark.parametrize(
    "precision, kv, message",
    [
        ("int8-wo", "int8", "cannot build int8-wo weights with an int8 KV cache"),
        ("int4-gptq", "model", "only from a checkpoint already quantized with GPTQ"),
        ("fp32", "model", "'fp32' is not one of them"),
    ],
)
def test_a_profile_offers_trtllm_only_for_pairs_it_builds(tmp_path, precision, kv, message):
    from engines.profiles import ProfileError, load_profile, load_profiles

    path = tmp_path / "mine.toml"
    path.write_text(
        f'name = "mine"\ndescription = "x"\nbackend = ["trtllm", "torch"]\nprecision = "{precision}"\n'
        f'kv_cache_dtype = "{kv}"\npriority = 1\n\n[requires]\ndevice = "cuda"\n'
    )
    with pytest.raises(ProfileError, match=re.escape(message)):
        load_profile(path)
    shipped = [p for p in load_profiles() if "trtllm" in p.backend]
    assert {(p.precision, p.kv_cache_dtype) for p in shipped} == {
        ("fp8", "fp8"),
        ("int8-sq", "int8"),
        ("int4-awq", "int8"),
        ("bf16", "model"),
    }
