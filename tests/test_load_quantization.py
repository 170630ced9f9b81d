"""Load-time int8 weight-only quantization (`--quantization`, engines/torch/load_quantization.py): what auto picks
per device, dtype and CPU class, that a model folder quantized at load is the engine `kiln build --precision
int8-wo` writes (same tensors, same greedy tokens), and the combinations refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from engines import cpu_isa
from engines.base import GenerationRequest
from engines.build.builder import build
from engines.config import EngineConfig
from engines.model_source import resolve_model
from engines.torch import load_quantization
from engines.torch.layers.linear import DenseLinear
from engines.torch.layers.quantized import Int8WeightOnlyLinear
from engines.torch.loader import build_core, load_model
from tests.build_fixtures import build_options, tiny_llama_config
from tests.conftest import greedy, run_to_completion
from tests.cpu_classes import CPU_CLASSES

CPU = torch.device("cpu")
PROMPTS = [[1, 500, 600, 700, 800, 900], [1, 42, 4242, 31337, 7, 7, 7, 9000]]


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory) -> Path:
    """A 2-layer random Llama with the default model's tokenizer (the server and the build need one)."""
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-chat")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(num_key_value_heads=2)).eval().save_pretrained(folder)
    default = resolve_model(None)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (default / name).is_file():
            shutil.copy(default / name, folder / name)
    return folder


@pytest.mark.parametrize("cpu_class", sorted(CPU_CLASSES))
def test_auto_quantizes_on_every_cpu_class_kiln_has_int8_kernels_for(monkeypatch, cpu_class):
    flags, level = CPU_CLASSES[cpu_class]
    monkeypatch.setattr(cpu_isa, "cpu_flags", lambda: flags)
    assert load_quantization.resolve(EngineConfig(), CPU) == (None if level is None else "int8-wo")


def test_auto_stays_dense_where_it_should():
    assert load_quantization.resolve(EngineConfig(dtype="float32"), CPU) is None  # parity with transformers
    assert load_quantization.resolve(EngineConfig(dtype="bfloat16"), CPU) is None
    assert load_quantization.resolve(EngineConfig(), torch.device("cuda")) is None
    assert load_quantization.resolve(EngineConfig(quantization="none"), CPU) is None


def test_named_quantization_applies_whatever_the_dtype():
    assert load_quantization.resolve(EngineConfig(quantization="int8-wo", dtype="float32"), CPU) == "int8-wo"


def test_refused_combinations():
    with pytest.raises(ValueError, match="engine directory is served with the precision it was built with"):
        EngineConfig(engine_dir="/engines/x", quantization="int8-wo").validate()
    with pytest.raises(ValueError, match="quantization must be one of auto, none, int8-wo"):
        EngineConfig(quantization="int3").validate()
    EngineConfig(engine_dir="/engines/x", quantization="none").validate()  # nothing to apply: accepted


def test_a_model_quantized_at_load_is_the_int8_wo_engine_the_build_writes(tiny_chat_model, tmp_path):
    engine_dir = tmp_path / "engine"
    build(build_options(tiny_chat_model, engine_dir, precision="int8-wo"))
    built = load_model(EngineConfig(engine_dir=str(engine_dir), dtype="float32"))
    loaded = load_model(EngineConfig(model=str(tiny_chat_model), dtype="float32", quantization="int8-wo"))

    assert loaded.quantization == "int8-wo"
    dense = load_model(EngineConfig(model=str(tiny_chat_model), dtype="float32"))
    linears = [m for m in loaded.model.modules() if isinstance(m, Int8WeightOnlyLinear)]
    assert len(linears) == sum(isinstance(m, DenseLinear) for m in dense.model.modules())  # the LM head too
    ours, theirs = loaded.model.state_dict(), built.model.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name

    def tokens(model) -> dict:
        core = build_core(EngineConfig(kv_cache_memory=16 << 20), model)
        return run_to_completion(
            core, [GenerationRequest(f"r{i}", p, greedy(12, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
        )

    assert tokens(loaded) == tokens(built)


def test_dense_unless_asked(tiny_chat_model):
    loaded = load_model(EngineConfig(model=str(tiny_chat_model), dtype="float32"))
    assert loaded.quantization is None
    assert not any(isinstance(m, Int8WeightOnlyLinear) for m in loaded.model.modules())
    assert sum(isinstance(m, DenseLinear) for m in loaded.model.modules()) == 2 * 4 + 1  # qkv, o, gate_up, down; head


@pytest.mark.slow
def test_the_default_models_greedy_answer_does_not_depend_on_how_its_prompt_was_prefilled():
    """int8 weights with bf16 activations (the default on a CPU with native bf16): a prompt prefilled whole (a
    bf16 GEMM on the codes), from the prefix cache (its tail through the decode-sized kernel) or in chunks gives
    the same greedy tokens. Dequantizing q * s to bf16 for the GEMM changed the very first token of this answer."""
    loaded = load_model(EngineConfig(dtype="bfloat16", quantization="int8-wo"))
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
    prompt = loaded.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert len(prompt) > 32  # longer than the kernel's decode-sized steps (int_linear.SMALL_M_MAX_INT8)

    def answer(core, request_id: str) -> list[int]:
        done = run_to_completion(core, [GenerationRequest(request_id, prompt, greedy(24))])
        return done[request_id]

    cached = build_core(EngineConfig(kv_cache_memory=64 << 20), loaded)
    whole = answer(cached, "whole")
    assert answer(cached, "from-the-prefix-cache") == whole
    chunked = build_core(EngineConfig(kv_cache_memory=64 << 20, max_num_batched_tokens=20), loaded)
    assert answer(chunked, "chunked") == whole
