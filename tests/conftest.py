"""Shared fixtures: tiny random models built in-process, the real default model (loaded once), an
engine factory whose engines get their block accounting checked after every test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engines.base import GenerationRequest, SamplingParams
from engines.config import EngineConfig
from engines.torch.llm_engine import LLMEngine
from engines.torch.loader import LoadedModel, build_core, load_checkpoint, load_model

DATA = Path(__file__).parent / "data"

TINY_CONFIGS = {
    # initializer_range 0.2 makes random logits peaked, so greedy argmax has no near-ties.
    "llama-gqa": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "llama-mha": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "llama3-rope": dict(
        model_type="llama",
        num_attention_heads=4,
        num_key_value_heads=1,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "mistral-gqa": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2, sliding_window=4096),
    # sliding windows of 8, shorter than the test prompts: Mistral's on every layer, Qwen2's on the layers from
    # max_window_layers on (layer 1 of 2)
    "mistral-window": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2, sliding_window=8),
    "qwen2-window": dict(
        model_type="qwen2",
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
    ),
    "qwen2-gqa": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen2-mha": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    # Qwen3's head_dim is its own: 32 here, with hidden 64 over 4 heads
    "qwen3-gqa": dict(model_type="qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "qwen3-mha-bias": dict(
        model_type="qwen3", num_attention_heads=4, num_key_value_heads=4, head_dim=24, attention_bias=True
    ),
    "olmo2-gqa": dict(model_type="olmo2", num_attention_heads=4, num_key_value_heads=2),
    "olmo2-mha": dict(model_type="olmo2", num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    # Gemma: layers alternate sliding (window 8, shorter than the test prompts) and global; Gemma 2 soft-caps the
    # scores and the logits (caps low enough to bend random scores), Gemma 3's sliding layers have their own theta
    "gemma2-gqa": dict(
        model_type="gemma2",
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_hidden_layers=4,
        sliding_window=8,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
    ),
    "gemma3-gqa": dict(
        model_type="gemma3_text",
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_hidden_layers=4,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=24,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        },
    ),
    # Phi-3: LongRoPE (short factors within original_max_position_embeddings, the attention factor of 1024 / 256);
    # Phi-4-mini's layout: RoPE on 0.75 of each head, tied embeddings
    "phi3-longrope": dict(
        model_type="phi3",
        pad_token_id=0,  # Phi3Config's default (32000) lies outside the tiny vocabulary
        num_attention_heads=4,
        num_key_value_heads=2,
        original_max_position_embeddings=256,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.5 * i for i in range(8)],
            "long_factor": [2.0 + 3.0 * i for i in range(8)],
        },
    ),
    "phi4-partial-rope": dict(
        model_type="phi3",
        pad_token_id=0,  # Phi3Config's default (32000) lies outside the tiny vocabulary
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=True,
        original_max_position_embeddings=256,
        partial_rotary_factor=0.75,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.75,
            "short_factor": [1.0 + 0.5 * i for i in range(6)],
            "long_factor": [2.0 + 3.0 * i for i in range(6)],
        },
    ),
    # mixtures of experts: 8 experts of 32, top 2 (the router spreads the prompts' tokens over all 8: test_moe.py)
    "mixtral-moe": dict(
        model_type="mixtral",
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        intermediate_size=32,
    ),
    # Qwen3-MoE without renormalising the top k (its default); head_dim of its own, 4 experts
    "qwen3-moe": dict(
        model_type="qwen3_moe",
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=False,
    ),
}


def make_tiny_hf_model(name: str, folder: Path):
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Olmo2Config,
        Olmo2ForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    spec = dict(TINY_CONFIGS[name])
    model_type = spec.pop("model_type")
    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
        "olmo2": (Olmo2Config, Olmo2ForCausalLM),
        "gemma2": (Gemma2Config, Gemma2ForCausalLM),
        "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM),
        "phi3": (Phi3Config, Phi3ForCausalLM),
        "mixtral": (MixtralConfig, MixtralForCausalLM),
        "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
    }[model_type]
    spec.setdefault("num_hidden_layers", 2)
    spec.setdefault("intermediate_size", 128)
    config = config_cls(
        vocab_size=512,
        hidden_size=64,
        max_position_embeddings=1024,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        **spec,
    )
    torch.manual_seed(1234)
    model = model_cls(config).eval()
    randomize_init_constants(model)
    model.save_pretrained(folder)
    return model


def randomize_init_constants(model) -> None:
    """Random init leaves biases at zero and norm weights at one, where a bias or norm kiln skipped or swapped
    would change nothing: give them random values (the norms only in families added since, whose reference
    tokens this does not move; Qwen3 and OLMo 2 have q/k norms)."""
    norms = model.config.model_type in ("qwen3", "olmo2", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen3_moe")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.2)
            elif norms and "norm" in name:
                # Gemma's norms scale by 1 + weight: around 0 there, around 1 elsewhere
                param.normal_(0 if model.config.model_type.startswith("gemma") else 1, 0.2)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """name -> (kiln LoadedModel in float32, HF reference model)"""
    cache = {}

    def get(name: str):
        if name not in cache:
            from transformers import AutoConfig

            folder = tmp_path_factory.mktemp(name)
            hf = make_tiny_hf_model(name, folder)
            cfg = AutoConfig.from_pretrained(folder)
            model = load_checkpoint(folder, cfg, torch.float32, torch.device("cpu"))
            cache[name] = (LoadedModel(model, cfg, None, name, folder, torch.float32, torch.device("cpu")), hf)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def reference(tiny_models):
    """name -> transformers' greedy tokens for tests/arch_parity.py's prompts (computed once per model)."""
    from tests.arch_parity import reference_tokens  # here: arch_parity imports this module

    cache: dict[str, list[list[int]]] = {}

    def get(name: str) -> list[list[int]]:
        if name not in cache:
            cache[name] = reference_tokens(tiny_models(name)[1])
        return cache[name]

    return get


@pytest.fixture(scope="session")
def default_model():
    """The embedded SmolLM2-135M-Instruct in float32 for kiln, loaded once per session."""
    return load_model(EngineConfig(dtype="float32"))


@pytest.fixture(scope="session")
def default_hf_model(default_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model.folder, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def chat_prompts(default_model) -> list[list[int]]:
    tok = default_model.tokenizer
    convs = json.loads((DATA / "chat_prompts.json").read_text())
    return [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False) for c in convs]


@pytest.fixture
def make_engine():
    """Build LLMEngine cores; after the test, every block is accounted for and none leaked."""
    made: list[LLMEngine] = []

    def make(loaded: LoadedModel, draft: LoadedModel | None = None, **overrides) -> LLMEngine:
        settings = dict(kv_cache_memory=64 << 20, block_size=16)
        settings.update(overrides)
        core = build_core(EngineConfig(**settings), loaded, draft)
        made.append(core)
        return core

    yield make
    for core in made:
        check_block_accounting(core)


def check_block_accounting(core: LLMEngine) -> None:
    """The target's pool (and a draft model's) accounts for every block; between steps a sequence holds
    exactly the blocks its computed tokens fill (rejected speculative tokens' blocks were given back);
    nothing stays used once idle."""
    pools = [(core.bm, core.live_sequences())]
    if getattr(core.proposer, "bm", None) is not None:
        pools.append((core.proposer.bm, core.proposer.live_states()))
    for bm, live in pools:
        bm.check_invariants(live)
        for seq in live:
            assert len(seq.block_table) == -(-seq.num_computed_tokens // bm.block_size), (
                "blocks held past the computed tokens"
            )
        if not core.live_sequences():
            assert bm.num_used == 0, "blocks leaked after all requests ended"


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def run_to_completion(core: LLMEngine, requests: list[GenerationRequest], arrivals: dict[str, int] | None = None):
    """Drive `core` step by step; a request with arrivals[id] = k is added before step k.
    Returns request id -> {choice index -> token ids}."""
    arrivals = arrivals or {}
    pending = sorted(requests, key=lambda r: arrivals.get(r.request_id, 0))
    tokens: dict[str, dict[int, list[int]]] = {r.request_id: {} for r in requests}
    step = 0
    while pending or core.has_work():
        while pending and arrivals.get(pending[0].request_id, 0) <= step:
            core.add_request(pending.pop(0))
        for out in core.step():
            for choice in out.outputs:
                tokens[out.request_id].setdefault(choice.index, []).extend(choice.new_token_ids)
        step += 1
    return tokens


@pytest.fixture
def kernels_decide_again():
    """Kernels and `--dtype auto` decide again under the CPU flags the test sets (KILN_CPU_ISA with monkeypatch, or
    a patched flag source), and again after it, under the real ones (extension.reset: the documented way)."""
    from engines.torch.kernels import extension

    extension.reset()
    yield
    extension.reset()
