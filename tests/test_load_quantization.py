"""Load-time quantization (`--quantization`, engines/torch/load_quantization.py): what auto picks per source, device,
dtype and CPU class; that a model folder quantized at load is the engine `kiln build --precision int8-wo` writes
(same tensors, same greedy tokens); that the default GGUF model served as its own Q4_1 blocks answers as its dense
weights do; and the combinations refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from engines import cpu_isa
from engines.base import GenerationRequest, SamplingParams
from engines.build.builder import build
from engines.config import EngineConfig
from engines.model_source import resolve_model
from engines.torch import load_quantization
from engines.torch.layers.affine_int4 import AffineInt4Linear
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
def test_auto_quantizes_on_every_cpu_class_kiln_has_int_kernels_for(monkeypatch, cpu_class, tiny_chat_model):
    flags, level = CPU_CLASSES[cpu_class]
    monkeypatch.setattr(cpu_isa, "cpu_flags", lambda: flags)
    # the embedded default is a GGUF file: its own blocks on AVX-512 CPUs, int8 weights on AVX2 ones (measured
    # faster there); a model folder: int8 weights
    default = None if level is None else "int8-wo" if level == "avx2" else "gguf"
    assert load_quantization.resolve(EngineConfig(), CPU) == default
    folder = EngineConfig(model=str(tiny_chat_model))
    assert load_quantization.resolve(folder, CPU) == (None if level is None else "int8-wo")


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
    with pytest.raises(ValueError, match="quantization must be one of auto, none, int8-wo, gguf"):
        EngineConfig(quantization="int3").validate()
    EngineConfig(engine_dir="/engines/x", quantization="none").validate()  # nothing to apply: accepted


def test_gguf_needs_a_gguf_file(tiny_chat_model):
    with pytest.raises(ValueError, match="serves a .gguf file's own blocks; .* is not a GGUF file"):
        load_quantization.resolve(EngineConfig(model=str(tiny_chat_model), quantization="gguf"), CPU)


def test_the_default_model_served_as_its_q4_1_blocks_answers_as_its_dense_weights(default_model, chat_prompts):
    """In float32 the blocks decode to exactly the dense checkpoint's weights (the dense model itself equals
    transformers, test_engine_hf_parity), so with the same LM head (int8-wo: the file stores the tied embeddings as
    Q8_0, not Q4_1) only the order of the decode kernel's fp32 sums differs: both answer alike, token for token,
    until the dense model's top two logprobs come within NEAR_TIE of each other (there fp32 rounding may decide)."""
    near_tie = 1e-4
    blocks = load_model(EngineConfig(dtype="float32", quantization="gguf"))
    assert blocks.quantization == "gguf"
    layers = [m for m in blocks.model.modules() if isinstance(m, AffineInt4Linear)]
    assert len(layers) == 4 * default_model.model.args.num_layers
    dense_layer = default_model.model.layers[3].gate_up_proj
    assert torch.equal(blocks.model.layers[3].gate_up_proj.dequantized_weight(torch.float32), dense_layer.weight)
    assert isinstance(blocks.model.lm_head, Int8WeightOnlyLinear)
    # the shared fixture's head, swapped by hand: monkeypatch's undo deletes what nn.Module keeps in _modules
    dense_head = default_model.model.lm_head
    default_model.model.lm_head = blocks.model.lm_head

    def answers(loaded) -> dict[str, list]:
        core = build_core(EngineConfig(kv_cache_memory=64 << 20), loaded)
        params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=2)
        for i, p in enumerate(chat_prompts):
            core.add_request(GenerationRequest(f"r{i}", p, params))
        out: dict[str, list] = {f"r{i}": [] for i in range(len(chat_prompts))}
        while core.has_work():
            for o in core.step():
                out[o.request_id].extend(o.outputs[0].new_logprobs)
        return out

    try:
        dense, ours = answers(default_model), answers(blocks)
    finally:
        default_model.model.lm_head = dense_head
    compared = 0
    for rid, steps in dense.items():
        for step, (d, b) in enumerate(zip(steps, ours[rid])):
            (_, first), (_, second) = d.top[:2]
            if first - second < near_tie:
                break
            assert b.token_id == d.token_id, f"{rid} token {step}"
            assert abs(b.logprob - d.logprob) < near_tie, f"{rid} token {step}"
            compared += 1
    assert compared >= 0.75 * 32 * len(chat_prompts)  # near-ties are rare: most of every answer is compared


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


BF16_NEAR_TIE = 0.25  # nats: bf16 activations move a logprob by up to ~0.17 between equivalent summation orders


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int8-wo", "gguf"])
def test_the_default_models_greedy_answer_does_not_depend_on_how_its_prompt_was_prefilled(quantization):
    """Quantized weights with bf16 activations (the default on a CPU with native bf16): a prompt prefilled whole (a
    bf16 GEMM on the dequantized weights), from the prefix cache (its tail through the decode-sized kernel) or in
    chunks multiplies by the same weights, so the answers agree token for token until the whole answer's top two
    logprobs come within BF16_NEAR_TIE (where the order of the fp32 sums, rounded to bf16, may decide). int8:
    dequantizing q * s to bf16 for the GEMM changed the very first token of the first answer, so both paths round
    the codes' dot product instead; gguf: both multiply by the bf16-rounded d * u + m."""
    loaded = load_model(EngineConfig(dtype="bfloat16", quantization=quantization))
    compared = 0
    for text in ("Write a long story about a lighthouse keeper and the sea.", "Explain how a refrigerator works."):
        prompt = loaded.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert len(prompt) > 32  # longer than the kernels' decode-sized steps (int_linear.SMALL_M_MAX_INT8)

        def answer(core, request_id: str, prompt: list[int] = prompt) -> list:
            core.add_request(
                GenerationRequest(request_id, prompt, SamplingParams(temperature=0.0, max_tokens=24, logprobs=2))
            )
            out = []
            while core.has_work():
                for o in core.step():
                    out.extend(o.outputs[0].new_logprobs)
            return out

        cached = build_core(EngineConfig(kv_cache_memory=64 << 20), loaded)
        whole = answer(cached, "whole")
        chunked = build_core(EngineConfig(kv_cache_memory=64 << 20, max_num_batched_tokens=20), loaded)
        for other in (answer(cached, "from-the-prefix-cache"), answer(chunked, "chunked")):
            for step, (w, o) in enumerate(zip(whole, other)):
                if w.top[0][1] - w.top[1][1] < BF16_NEAR_TIE:
                    break
                assert o.token_id == w.token_id, f"{text!r} token {step}"
                compared += 1
    assert compared >= 10  # the answers' first tokens are no near-ties: the comparison is not vacuous
