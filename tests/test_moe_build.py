"""`kiln build` of tiny random Mixtral and Qwen3-MoE models (tests/test_qwen3_olmo2_build.py's models, builds and
budgets): every expert's projections are quantized (each calibrated on the tokens routed to it), the routers stay
dense, and int8-sq and int4-awq engines stay within the KL budget the build itself enforces (--max-accuracy-loss,
against the unfolded int8-wo and int4-rtn of the same model), load from their directories and generate."""

from __future__ import annotations

import math

import pytest

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
