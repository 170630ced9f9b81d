"""`kiln build` of tiny random Gemma 2, Gemma 3 and Phi-4-mini-like models (the default tokenizer's vocabulary):
int8-sq and int4-awq engines stay within the KL budget the build itself enforces (--max-accuracy-loss), with the
budgets of tests/test_qwen3_olmo2_build.py (the same model quantized without any fold, times a factor), load from
their directories with their norms and generate. Gemma's scales fold into its input and pre-MLP norms, never into
the norms after each sublayer (see gemma.TOPOLOGY)."""

from __future__ import annotations

import math

import pytest

from engines.base import GenerationRequest
from engines.config import EngineConfig
from engines.torch.loader import build_core, load_engine_dir
from tests.conftest import greedy, run_to_completion
from tests.test_qwen3_olmo2_build import BUDGETS, EXPECTED_LAYER, PROMPTS, built  # noqa: F401 (built: a fixture)


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
