"""`kiln build` of tiny random Qwen3 and OLMo 2 models (the default tokenizer's vocabulary): int8-sq and int4-awq
engines stay within a KL budget the build itself enforces (--max-accuracy-loss), load from their directories with
their q/k norms, and generate.

The budgets come from the same model quantized without any fold: SmoothQuant's scales fold exactly (see
tests/test_qwen3_olmo2.py), so int8-sq loses about what int8-wo loses (a scale folded into OLMo 2's post-norms
instead measured 0.44 nats against 0.001); AWQ's per-layer search includes RTN's unscaled weights, so int4-awq
stays near int4-rtn (0.86x of it here for both; folds misplaced that way measured 1.27x)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from engines.base import GenerationRequest
from engines.build.builder import build
from engines.config import EngineConfig
from engines.model_source import resolve_model
from engines.torch.loader import build_core, load_engine_dir
from tests.build_fixtures import build_options
from tests.conftest import greedy, randomize_init_constants, run_to_completion

PROMPTS = [[1, 500, 600, 700, 800, 900], [1, 42, 4242, 31337, 7, 7, 7, 9000]]
# (precision, the unfolded precision whose KL sets its budget, factor)
BUDGETS = {"int8-sq": ("int8-wo", 3.0), "int4-awq": ("int4-rtn", 1.2)}
EXPECTED_LAYER = {"int8-sq": "W8A8Int8Linear", "int4-awq": "Int4WeightOnlyLinear"}


def save_tiny_chat_model(model_type: str, folder: Path) -> None:
    """2 layers, hidden 64, every query head its own KV head (so o_proj's scale folds into the v rows too)."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        MistralConfig,
        MistralForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Olmo2Config,
        Olmo2ForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    # Gemma: a sliding layer (window 8, shorter than the calibration and evaluation prompts) and a global one;
    # Phi: Phi-4-mini's layout (LongRoPE on 0.75 of each head)
    gemma = {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8}
    layer_types = ["sliding_attention", "full_attention"]
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}
    rope |= {"short_factor": [1.0 + 0.2 * i for i in range(6)], "long_factor": [2.0 + i for i in range(6)]}
    experts = {"num_experts_per_tok": 2}  # of 4 experts (of 128 rows each for Mixtral, 64 for Qwen3-MoE)
    config_cls, model_cls, extra = {
        "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 32}),
        "olmo2": (Olmo2Config, Olmo2ForCausalLM, {}),
        "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 8}),  # windowed past the prompts' length
        "gemma2": (Gemma2Config, Gemma2ForCausalLM, gemma),
        "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM, gemma | {"layer_types": layer_types}),
        "phi3": (Phi3Config, Phi3ForCausalLM, {"rope_parameters": rope, "original_max_position_embeddings": 512}),
        "mixtral": (MixtralConfig, MixtralForCausalLM, experts | {"num_local_experts": 4}),
        "qwen3_moe": (
            Qwen3MoeConfig,
            Qwen3MoeForCausalLM,
            experts | {"num_experts": 4, "moe_intermediate_size": 64, "head_dim": 32, "norm_topk_prob": True},
        ),
    }[model_type]
    config = config_cls(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **extra,
    )
    torch.manual_seed(0)
    model = model_cls(config).eval()
    randomize_init_constants(model)
    model.save_pretrained(folder)
    copy_default_tokenizer(folder)


def copy_default_tokenizer(folder: Path) -> None:
    default = resolve_model(None)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (default / name).is_file():
            shutil.copy(default / name, folder / name)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(model_type, precision, build options) -> (engine directory, BuildResult); built once per module."""
    folders: dict[str, Path] = {}
    results: dict[tuple, tuple[Path, object]] = {}

    def get(model_type: str, precision: str, **kw):
        if model_type not in folders:
            folders[model_type] = tmp_path_factory.mktemp(model_type) / "model"
            save_tiny_chat_model(model_type, folders[model_type])
        key = (model_type, precision, *sorted(kw.items()))
        if key not in results:
            out = tmp_path_factory.mktemp(f"{model_type}-{precision}") / "engine"
            results[key] = (out, build(build_options(folders[model_type], out, precision=precision, **kw)))
        return results[key]

    return get


@pytest.mark.parametrize("precision", list(BUDGETS))
@pytest.mark.parametrize("model_type", ["qwen3", "olmo2", "mistral"])
def test_quantized_engine_stays_within_budget_loads_and_generates(built, model_type, precision):
    baseline, factor = BUDGETS[precision]
    baseline_kl = built(model_type, baseline)[1].report["accuracy"]["kl_mean"]
    assert math.isfinite(baseline_kl) and baseline_kl > 0
    # the build refuses (BuildError) an engine past --max-accuracy-loss
    out, result = built(model_type, precision, max_accuracy_loss=factor * baseline_kl)
    accuracy = result.report["accuracy"]
    assert math.isfinite(accuracy["kl_mean"]) and accuracy["kl_mean"] <= factor * baseline_kl
    assert result.manifest.model.model_type == model_type and result.manifest.precision == precision

    loaded = load_engine_dir(EngineConfig(engine_dir=str(out)))
    layer = loaded.model.layers[0]
    assert type(layer.qkv_proj).__name__ == type(layer.down_proj).__name__ == EXPECTED_LAYER[precision]
    if model_type == "mistral":
        assert layer.window == 8  # the engine serves the window past itself (max_model_len is not capped at it)
    else:
        assert layer.q_norm.shape == ((32,) if model_type == "qwen3" else (4 * 16,))
    core = build_core(EngineConfig(kv_cache_memory=16 << 20), loaded)
    requests = [GenerationRequest(str(i), p, greedy(12, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    tokens = run_to_completion(core, requests)
    assert all(len(t[0]) == 12 for t in tokens.values())
