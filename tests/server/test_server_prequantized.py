"""`kiln serve --model` a pre-quantized folder (AutoAWQ's GEMM packing): over HTTP, with the official openai SDK, its
greedy completion is the one kiln gives the float folder of the weights it dequantizes to."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from engines.base import GenerationRequest
from engines.config import EngineConfig
from engines.torch.loader import build_core, load_model
from tests import prequant_writers as writers
from tests.conftest import greedy, run_to_completion
from tests.prequant_folders import PROMPTS, write_pair
from tests.server.conftest import start_server

MAX_TOKENS = 16


@pytest.fixture(scope="module")
def awq_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("awq")
    state = load_file(str(_float_folder(tmp_path_factory) / "model.safetensors"))
    config = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    quantized, reference = write_pair(root, state, config, lambda m, w: writers.awq_linear(w, 32))
    server = start_server(tmp_path_factory.mktemp("awq-server"), "--model", str(quantized), "--dtype", "float32")
    yield server, reference
    server.stop()


def _float_folder(tmp_path_factory):
    import torch
    from transformers import LlamaForCausalLM

    from tests.build_fixtures import tiny_llama_config

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(num_key_value_heads=2)).save_pretrained(folder)
    return folder


def test_served_awq_folder_completes_as_its_dequantized_weights(awq_server):
    from openai import OpenAI

    server, reference = awq_server
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    [model] = [m.id for m in client.models.list().data]
    completion = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)

    loaded = load_model(EngineConfig(model=str(reference), dtype="float32"))
    core = build_core(EngineConfig(kv_cache_memory=16 << 20), loaded)
    expected = run_to_completion(core, [GenerationRequest("r", PROMPTS[0], greedy(MAX_TOKENS))])["r"][0]
    assert completion.choices[0].text == loaded.tokenizer.decode(expected)
    assert completion.usage.completion_tokens == len(expected)
