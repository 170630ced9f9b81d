"""POST /tokenize and /detokenize (vLLM's shapes) against the live server, and the completions max_tokens default."""

from __future__ import annotations

import json

import httpx
import pytest

from .conftest import assert_error

pytestmark = pytest.mark.slow

PROMPT = "The three primary colours are"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.fixture(scope="module")
def limits(http) -> tuple[int, int]:
    """(max_model_len, vocab_size) of the served model."""
    metadata = http.get("/v1/metadata").json()
    return metadata["max_model_len"], metadata["vocab_size"]


def tokenize(http, **body) -> dict:
    response = http.post("/tokenize", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def prompt_tokens(http, path: str, **body) -> int:
    response = http.post(path, json={"max_tokens": 1, **body})
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens"]


def test_tokenize_a_prompt_counts_what_completions_reports(http, model_name, limits):
    result = tokenize(http, model=model_name, prompt=PROMPT)
    assert set(result) == {"count", "max_model_len", "tokens", "token_strs"}
    assert result["count"] == len(result["tokens"]) == prompt_tokens(http, "/v1/completions", prompt=PROMPT)
    assert result["max_model_len"] == limits[0] and result["token_strs"] is None
    assert prompt_tokens(http, "/v1/completions", prompt=result["tokens"]) == result["count"]


def test_token_strs(http):
    result = tokenize(http, prompt=PROMPT, return_token_strs=True)  # no model: the served one
    assert len(result["token_strs"]) == result["count"]
    assert "".join(result["token_strs"]).replace("Ġ", " ") == PROMPT  # byte-level BPE spells a space "Ġ"


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_tokenize_messages_counts_what_chat_reports(http, model_name, tools):
    extra = {"tools": tools} if tools else {}
    result = tokenize(http, model=model_name, messages=CHAT, **extra)
    assert result["count"] == prompt_tokens(http, "/v1/chat/completions", messages=CHAT, **extra)
    assert (result["count"] > tokenize(http, messages=CHAT)["count"]) == bool(tools)  # the tools are in the prompt


def test_detokenize_round_trip(http, model_name):
    tokens = tokenize(http, prompt=PROMPT)["tokens"]
    response = http.post("/detokenize", json={"model": model_name, "tokens": tokens})
    assert response.status_code == 200 and response.json() == {"prompt": PROMPT}
    rendered = http.post("/detokenize", json={"tokens": tokenize(http, messages=CHAT)["tokens"]}).json()["prompt"]
    assert "You are terse." in rendered and rendered.rstrip().endswith("assistant")  # the generation prompt
    assert http.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize(
    "body, contains",
    [
        ({"prompt": "x", "messages": CHAT}, "exactly one of prompt"),
        ({}, "exactly one of prompt"),
        ({"prompt": "x", "tools": TOOLS}, "tools"),
        ({"messages": CHAT, "add_generation_prompt": False}, "add_generation_prompt"),
        ({"messages": CHAT, "add_special_tokens": True}, "add_special_tokens"),
        ({"prompt": "a\ud800"}, "not valid Unicode"),
        ({"messages": [{"role": "user", "content": "\udc00"}]}, "not valid Unicode"),
    ],
)
def test_tokenize_refuses(http, body, contains):
    # json.dumps escapes a lone surrogate as \\ud800, which is what a client sends
    response = http.post("/tokenize", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert_error(response, 400, contains=contains)


def test_inputs_longer_than_the_context_are_400(http, limits):
    max_model_len = limits[0]
    for path, body in (
        ("/tokenize", {"prompt": "word " * (max_model_len + 10)}),
        ("/detokenize", {"tokens": [1] * (max_model_len + 1)}),
    ):
        error = assert_error(http.post(path, json=body), 400, contains="maximum context length")
        assert error["code"] == "context_length_exceeded"


def test_token_ids_outside_the_vocabulary_are_400(http, limits):
    vocab_size = limits[1]
    for bad in (-1, vocab_size, 2**63 - 1):
        error = assert_error(http.post("/detokenize", json={"tokens": [1, bad]}), 400, contains=str(bad))
        assert error["param"] == "tokens"
    assert_error(http.post("/detokenize", json={"tokens": [2**64]}), 400)


def test_unknown_fields_are_400_and_another_model_404(http):
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
        error = assert_error(http.post(path, json={**body, "continue_final_message": True}), 400)
        assert error["param"] == "continue_final_message"
        error = assert_error(http.post(path, json={**body, "model": "no-such-model"}), 404)
        assert error["code"] == "model_not_found"


def test_served_at_the_root_only_and_behind_the_api_key(live_server, http):
    for path in ("/v1/tokenize", "/v1/detokenize"):
        assert_error(http.post(path, json={"prompt": "x", "tokens": [1]}), 404)
    with httpx.Client(base_url=live_server.base_url, timeout=30) as anonymous:
        assert_error(anonymous.post("/tokenize", json={"prompt": "x"}), 401)
        assert_error(anonymous.post("/detokenize", json={"tokens": [1]}), 401)


def test_completions_default_to_16_tokens_and_chat_to_the_context(http, model_name):
    body = {"model": model_name, "prompt": "Once upon a time", "temperature": 0, "ignore_eos": True}
    response = http.post("/v1/completions", json=body).json()
    assert response["usage"]["completion_tokens"] == 16 and response["choices"][0]["finish_reason"] == "length"
    # chat has no such default: its stream goes on past 16 steps (leaving it then aborts the request)
    chat = {"model": model_name, "messages": CHAT, "temperature": 0, "ignore_eos": True, "stream": True}
    steps = 0
    with http.stream("POST", "/v1/chat/completions", json=chat) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data: "):
                continue
            choice = json.loads(line[len("data: ") :])["choices"][0]
            assert choice["finish_reason"] is None, choice
            steps += "role" not in choice["delta"]  # a chunk for every step after the first, the role's
            if steps > 16:
                break
    assert steps > 16
