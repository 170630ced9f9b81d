"""`kiln build` of tiny random Gemma 2, Gemma 3 and Phi-4-mini-like models (the default tokenizer's vocabulary):
int8-sq and int4-awq engines stay within the KL budget the build itself enforces (--max-accuracy-loss), with the
budgets of tests/test_qwen3_olmo2_build.py (the same model quantized without any fold, times a factor), load from
their directories with their norms and generate. Gemma's scales fold into its input and pre-MLP norms, never into
the norms after each sublayer (see gemma.TOPOLOGY). Gemma 2 (windows and soft-caps) builds with an int8 KV cache
too."""

from __future__ import annotations

import math

import pytest
import torch

from engines.base import GenerationRequest
from engines.config import EngineConfig
from engines.torch.loader import build_core, load_engine_dir
from tests.conftest import greedy, run_to_completion
from tests.test_qwen3_olmo2_build import BUDGETS, EXPECTED_LAYER, PROMPTS, built  # noqa: F401 (built: a fixture)

# an int8 KV cache on top of int8-wo weights: KL within this factor of int8-wo's alone (measured 1.3x: 0.0009 / 0.0007)
KV_FACTOR = 2.0


@pytest.mark.parametrize("precision", list(BUDGETS))
@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text", "phi3"])
def test_quantized_engine_stays_within_budget_loads_and_generates(built, model_type, precision):  # noqa: F811
    baseline, factor = BUDGETS[precision]
    baseline_kl = built(model_type, baseline)[1].report["accuracy"]["kl_mean"]
    assert math.isfinite(baseline_kl) and baseline_kl > 0
    out, result = built(model_type, precision, max_accuracy_loss=factor * baseline_kl)
    accuracy = result.report["accuracy"]
    assert math.isfinite(accuracy["kl_mean"]) and accuracy["kl_mean"] <= factor * baseline_kl
    assert result.manifest.model.model_type == model_type and result.manifest.precision == precision
    print(f"{model_type} {precision}: KL {accuracy['kl_mean']:.4f} (budget {factor} x {baseline_kl:.4f})")

    loaded = load_engine_dir(EngineConfig(engine_dir=str(out)))
    assert type(loaded.model).__name__ == ("Phi3ForCausalLM" if model_type == "phi3" else "GemmaForCausalLM")
    layer = loaded.model.layers[0]
    assert type(layer.qkv_proj).__name__ == type(layer.down_proj).__name__ == EXPECTED_LAYER[precision]
    if model_type.startswith("gemma"):
        assert layer.window == 8 and loaded.model.layers[1].window is None
    core = build_core(EngineConfig(kv_cache_memory=16 << 20), loaded)
    requests = [GenerationRequest(str(i), p, greedy(12, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    tokens = run_to_completion(core, requests)
    assert all(len(t[0]) == 12 for t in tokens.values())


def test_int8_kv_cache_build_loads_and_generates(built):  # noqa: F811
    """The build calibrates per-layer, per-KV-head scales through Gemma 2's windowed, soft-capped attention, its
    evaluation runs the int8 cache, and the engine directory serves with it."""
    baseline_kl = built("gemma2", "int8-wo")[1].report["accuracy"]["kl_mean"]
    out, result = built("gemma2", "int8-wo", kv_cache_dtype="int8")
    kl = result.report["accuracy"]["kl_mean"]
    assert result.manifest.kv_cache_dtype == "int8" and math.isfinite(kl) and kl <= KV_FACTOR * baseline_kl

    loaded = load_engine_dir(EngineConfig(engine_dir=str(out)))
    assert loaded.kv_cache_dtype == "int8" and tuple(loaded.kv_cache_scales.shape) == (2, 2, 4)
    assert (loaded.kv_cache_scales > 0).all()
    core = build_core(EngineConfig(kv_cache_memory=16 << 20), loaded)
    assert core.runner.kv_cache.data.dtype == torch.int8
    requests = [GenerationRequest(str(i), p, greedy(12, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    tokens = run_to_completion(core, requests)
    assert all(len(t[0]) == 12 for t in tokens.values())
