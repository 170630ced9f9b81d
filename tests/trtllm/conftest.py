"""Fixtures of the TensorRT-LLM contract tests: the recording fake of tensorrt_llm on sys.path (only for the
test that asks for it), GPUs to pretend to be, and a tiny model folder with the default tokenizer."""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path

import httpx
import pytest
import torch

from engines.hardware import Hardware

FAKE_ROOT = Path(__file__).parents[1] / "fake_trtllm"
GiB = 1 << 30
H100 = Hardware(device="cuda", name="NVIDIA H100 80GB HBM3", memory_bytes=80 * GiB, sm=90)
A100 = Hardware(device="cuda", name="NVIDIA A100-SXM4-80GB", memory_bytes=80 * GiB, sm=80)
T4 = Hardware(device="cuda", name="Tesla T4", memory_bytes=16 * GiB, sm=75)
CPU = Hardware(device="cpu", name="Intel Xeon", memory_bytes=24 * GiB)


def _forget_tensorrt_llm() -> None:
    for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
        del sys.modules[name]


@pytest.fixture
def fake_trtllm(monkeypatch):
    """The fake `tensorrt_llm` module (reset), importable for this test only."""
    _forget_tensorrt_llm()
    monkeypatch.syspath_prepend(str(FAKE_ROOT))
    import tensorrt_llm

    tensorrt_llm.reset()
    yield tensorrt_llm
    _forget_tensorrt_llm()


@pytest.fixture(scope="session")
def tiny_chat_folder(tmp_path_factory) -> Path:
    """A 1-layer random Llama with the default model's tokenizer: what `kiln build --backend trtllm` reads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from engines.model_source import resolve_model

    folder = tmp_path_factory.mktemp("trt-tiny")
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    default = resolve_model(None)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (default / name).is_file():
            shutil.copy(default / name, folder / name)
    return folder


@contextlib.asynccontextmanager
async def sdk_over_asgi(app):
    """The openai SDK (and httpx) talking to kiln's app in-process, with no retries that would hide a failure."""
    from openai import AsyncOpenAI

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kiln") as http:
        yield AsyncOpenAI(base_url="http://kiln/v1", api_key="unused", http_client=http, max_retries=0), http
