"""`kiln build` of a pre-quantized checkpoint (engines/build/prequantized.py): the engine directory keeps the stored
weights (no float copy of a quantized projection), serves what `kiln serve --model FOLDER` serves, and adds a KV cache
whose scales are calibrated (or the checkpoint's own) and whose cost the build report measures against the
checkpoint itself."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from engines.build.builder import build
from engines.build.result import BuildError
from engines.config import EngineConfig
from engines.torch.layers.quantized import Int4WeightOnlyLinear
from engines.torch.loader import load_model
from tests import prequant_writers as writers
from tests.build_fixtures import build_options
from tests.prequant_folders import answers, tiny_llama_state, write_fp8_static, write_pair

LOGPROB_TOL = 1e-3  # the same stored weights on both sides: only the kernels' fp32 summation order differs
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 16, "sym": True, "desc_act": False}


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return tiny_llama_state()


@pytest.fixture(scope="module")
def gptq_folder(state, tmp_path_factory):
    def linear(module: str, w: torch.Tensor):
        return writers.gptq_linear(w, 4, 16, True, None, v1=True)

    quantized, _ = write_pair(tmp_path_factory.mktemp("gptq"), state, GPTQ, linear)
    return quantized


def test_the_engine_keeps_the_stored_weights_and_serves_what_the_folder_serves(gptq_folder, tmp_path):
    result = build(build_options(gptq_folder, tmp_path / "engine", kv_cache_dtype="model"))
    manifest, report = result.manifest, result.report
    assert manifest.precision == "int4-gptq" and manifest.weight_formats["qkv_proj"] == "int4"
    assert manifest.calibration is None  # a float KV cache needs no calibration
    assert report["reference"].startswith("the pre-quantized checkpoint itself")
    assert report["details"] == {"prequantized": "gptq"}
    assert "Accuracy against the pre-quantized checkpoint itself" in (tmp_path / "engine/build-report.md").read_text()
    with safe_open(str(tmp_path / "engine/weights.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "layers.0.qkv_proj.weight" not in names  # no float copy of a quantized projection
    assert any(n.startswith("layers.0.qkv_proj.") for n in names)

    engine, ours = answers(EngineConfig(engine_dir=str(tmp_path / "engine"), dtype="float32"), max_tokens=16)
    assert isinstance(engine.model.layers[0].qkv_proj, Int4WeightOnlyLinear)
    _, theirs = answers(EngineConfig(model=str(gptq_folder), dtype="float32"), max_tokens=16)  # kiln serve --model
    for rid, steps in theirs.items():
        assert [s.token_id for s in ours[rid]] == [s.token_id for s in steps], rid
        assert max(abs(a.logprob - b.logprob) for a, b in zip(ours[rid], steps)) < LOGPROB_TOL, rid


def test_an_int8_kv_cache_is_calibrated_and_costs_what_the_report_says(gptq_folder, tmp_path):
    """The engine directory, loaded as `kiln serve --engine-dir` loads it, measured again on the build's held-out
    prompts against the folder served with a float KV cache: the mean KL the build report states."""
    from engines import calibration
    from engines.build.builder import CALIB_MAX_TOKENS
    from engines.build.evaluate import answer_rows
    from engines.build.greedy import greedy_answers
    from engines.build.prequantized import _accuracy
    from engines.torch.loader import eos_token_ids

    options = build_options(gptq_folder, tmp_path / "engine", kv_cache_dtype="int8")
    result = build(options)
    assert result.manifest.kv_cache_dtype == "int8" and result.manifest.calibration is not None
    assert result.report["details"]["kv_scales"] == "calibrated (minmax)"

    engine = load_model(EngineConfig(engine_dir=str(tmp_path / "engine")))
    reference = load_model(EngineConfig(model=str(gptq_folder), dtype="float32"))
    requests = calibration.load_chat_requests(calibration.default_eval_path())[: options.eval_samples]
    prompts = calibration.render_prompts(requests, reference.tokenizer, CALIB_MAX_TOKENS)
    cpu = torch.device("cpu")
    answers = greedy_answers(
        reference.model, prompts, options.eval_tokens, eos_token_ids(reference), cpu, progress=False
    )
    sequences = [p + a for p, a in zip(prompts, answers)]
    measured = _accuracy(
        reference.model,
        engine.model,
        sequences,
        answer_rows(prompts, answers),
        answers,
        "int8",
        engine.kv_cache_scales,
        engine.dtype,
        cpu,
    )
    assert measured.kl_mean == pytest.approx(result.report["accuracy"]["kl_mean"], rel=1e-3, abs=1e-7)
    assert measured.kl_mean > 0  # int8 keys and values cost something


def test_kv_auto_is_the_checkpoints_fp8_kv_cache_with_its_own_scales(state, tmp_path):
    quantized, _, kv = write_fp8_static(tmp_path / "ckpt", state)
    result = build(build_options(quantized, tmp_path / "engine", kv_cache_dtype="auto"))
    assert result.manifest.precision == "fp8" and result.manifest.kv_cache_dtype == "fp8"
    assert result.manifest.calibration is None  # the checkpoint's scales: nothing to calibrate
    assert result.report["details"]["kv_scales"] == "the checkpoint's (fp8)"
    engine = load_model(EngineConfig(engine_dir=str(tmp_path / "engine")))
    assert torch.equal(engine.kv_cache_scales, kv[:, :, None].expand(-1, -1, 2))


def test_another_precision_is_refused_in_one_sentence(gptq_folder, tmp_path):
    with pytest.raises(BuildError, match=r"already quantized \(gptq, stored as int4-gptq\) .* --precision int8-wo"):
        build(build_options(gptq_folder, tmp_path / "engine", precision="int8-wo"))
