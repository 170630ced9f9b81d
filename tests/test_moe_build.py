"""`kiln build` of tiny random Mixtral and Qwen3-MoE models (tests/test_qwen3_olmo2_build.py's models, builds and
budgets): every expert's projections are quantized (each calibrated on the tokens routed to it), the routers stay
dense, and int8-sq and int4-awq engines stay within the KL budget the build itself enforces (--max-accuracy-loss,
against the unfolded int8-wo and int4-rtn of the same model), load from their directories and generate."""

from __future__ import annotations

import math

import pytest
import torch

from engines.base import GenerationRequest
from engines.config import EngineConfig
from engines.torch.loader import build_core, load_engine_dir
from tests.conftest import greedy, run_to_completion
from tests.test_qwen3_olmo2_build import BUDGETS, EXPECTED_LAYER, PROMPTS, built  # noqa: F401 (built: a fixture)

# More evaluation tokens than the dense models' builds: a routing choice that flips under quantization moves a
# token's KL by a step, so 32 tokens measured Qwen3-MoE's int4-awq at 1.36x int4-rtn and 512 at 0.88x.
SAMPLES = dict(calib_samples=32, eval_samples=16, eval_tokens=32)


@pytest.mark.parametrize("precision", list(BUDGETS))
@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_quantized_moe_engine_stays_within_budget_loads_and_generates(built, model_type, precision):  # noqa: F811
    baseline, factor = BUDGETS[precision]
    baseline_kl = built(model_type, baseline, **SAMPLES)[1].report["accuracy"]["kl_mean"]
    assert math.isfinite(baseline_kl) and baseline_kl > 0
    out, result = built(model_type, precision, max_accuracy_loss=factor * baseline_kl, **SAMPLES)
    accuracy = result.report["accuracy"]
    print(f"{model_type} {precision}: kl_mean {accuracy['kl_mean']:.5f} ({baseline} {baseline_kl:.5f})")
    assert math.isfinite(accuracy["kl_mean"]) and accuracy["kl_mean"] <= factor * baseline_kl
    formats = result.manifest.weight_formats
    assert {formats[f"expert{e}_{kind}_proj"] for e in range(4) for kind in ("gate_up", "down")} == {
        formats["qkv_proj"]
    }

    loaded = load_engine_dir(EngineConfig(engine_dir=str(out)))
    layer = loaded.model.layers[1]
    assert {type(getattr(layer, kind)).__name__ for kind in loaded.model.projections} == {EXPECTED_LAYER[precision]}
    assert layer.router.shape == (4, 64) and layer.router.is_floating_point()
    core = build_core(EngineConfig(kv_cache_memory=16 << 20), loaded)
    requests = [GenerationRequest(str(i), p, greedy(12, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    tokens = run_to_completion(core, requests)
    assert all(len(t[0]) == 12 for t in tokens.values())


@pytest.mark.parametrize("precision", ["int8-sq", "int4-awq", "int4-gptq"])
def test_an_expert_no_calibration_token_reached_is_quantized_without_statistics(precision, tmp_path):
    """A router that never picks expert 0 (its row is zero, and experts 1 and 2 have rows v and -v, so one of them
    scores |h . v| >= 0 for every token, top-1): expert 0 sees no calibration token and has no statistics. It is
    quantized without them (no smoothing, round-to-nearest) and the report counts it; the engine loads and
    generates (before, the build stopped in torch.cat of no samples)."""
    from safetensors.torch import load_file, save_file
    from transformers import MixtralConfig, MixtralForCausalLM

    from engines.build.builder import build
    from tests.build_fixtures import build_options
    from tests.test_qwen3_olmo2_build import copy_default_tokenizer

    config = MixtralConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_local_experts=4,
        num_experts_per_tok=1,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    folder = tmp_path / "model"
    MixtralForCausalLM(config).eval().save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    for i in range(config.num_hidden_layers):
        router = weights[f"model.layers.{i}.block_sparse_moe.gate.weight"]
        router[0] = 0.0
        router[2] = -router[1]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    copy_default_tokenizer(folder)
    out = tmp_path / "engine"
    result = build(build_options(folder, out, precision=precision, calib_samples=16, eval_samples=2))
    assert result.report["details"]["uncalibrated_projections"] == 2 * (1 if precision == "int8-sq" else 2)
    loaded = load_engine_dir(EngineConfig(engine_dir=str(out)))
    core = build_core(EngineConfig(kv_cache_memory=16 << 20), loaded)
    tokens = run_to_completion(core, [GenerationRequest("0", PROMPTS[0], greedy(4, ignore_eos=True))])
    assert len(tokens["0"][0]) == 4
