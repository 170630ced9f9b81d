"""`kiln serve --model` a tiny random Qwen3 folder: over HTTP, with the official openai SDK, its greedy completion is
transformers' and its chat completion renders the folder's chat template."""

from __future__ import annotations

import pytest
import torch

from tests.server.conftest import start_server
from tests.test_engine_hf_parity import hf_greedy
from tests.test_qwen3_olmo2_build import save_tiny_chat_model

PROMPT = [1, 500, 600, 700, 800, 900]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def qwen3_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3") / "tiny-qwen3"
    save_tiny_chat_model("qwen3", folder)
    server = start_server(tmp_path_factory.mktemp("qwen3-server"), "--model", str(folder), "--dtype", "float32")
    yield server, folder
    server.stop()


def test_served_qwen3_completes_like_transformers_and_chats(qwen3_server):
    from openai import OpenAI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    server, folder = qwen3_server
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    [model] = [m.id for m in client.models.list().data]
    assert model == "tiny-qwen3"

    completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    expected = hf_greedy(hf, PROMPT, MAX_TOKENS, eos=True)
    assert completion.choices[0].text == AutoTokenizer.from_pretrained(folder).decode(expected)

    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].finish_reason in ("length", "stop") and chat.usage.prompt_tokens > 5
