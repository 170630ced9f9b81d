"""Prompt scoring over HTTP on the live server: echo + logprobs on /v1/completions (what lm-evaluation-harness
sends: max_tokens 1, logprobs 1, echo), max_tokens 0 with echo, streaming, and vLLM's prompt_logprobs on both
endpoints; the numbers are the engine's (tests/test_prompt_logprobs.py checks those against transformers)."""

from __future__ import annotations

import math

import pytest

from .conftest import assert_error, sse_events

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is Paris"


def _completion(http, model_name, **fields):
    response = http.post("/v1/completions", json={"model": model_name, "prompt": PROMPT, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def test_echo_with_logprobs_scores_the_prompt(http, model_name):
    tokenize = http.post("/tokenize", json={"model": model_name, "prompt": PROMPT}).json()
    choice = _completion(http, model_name, max_tokens=1, logprobs=1, echo=True, temperature=0)["choices"][0]
    logprobs = choice["logprobs"]
    n = tokenize["count"]
    assert len(logprobs["tokens"]) == n + 1  # the prompt's tokens, then the generated one
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(lp is not None and lp <= 0 for lp in logprobs["token_logprobs"][1:])
    assert "".join(logprobs["tokens"][:n]).endswith(PROMPT)
    assert choice["text"].startswith(PROMPT)
    # lm-evaluation-harness's greedy check: the token's logprob is the largest of its top_logprobs or not
    for lp, top in zip(logprobs["token_logprobs"][1:n], logprobs["top_logprobs"][1:n]):
        assert max(top.values()) >= lp
    assert logprobs["text_offset"][:2] == [0, len(logprobs["tokens"][0])]


def test_max_tokens_zero_with_echo_only_scores(http, model_name):
    body = _completion(http, model_name, max_tokens=0, logprobs=0, echo=True)
    choice = body["choices"][0]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["tokens"]) == body["usage"]["prompt_tokens"]
    assert body["usage"]["completion_tokens"] == 0
    assert_error(
        http.post("/v1/completions", json={"model": model_name, "prompt": PROMPT, "max_tokens": 0}),
        400,
        contains="echo",
    )


def test_streamed_echo_carries_the_prompt_logprobs(http, model_name):
    whole = _completion(http, model_name, max_tokens=4, logprobs=2, echo=True, temperature=0)["choices"][0]
    with http.stream(
        "POST",
        "/v1/completions",
        json={
            "model": model_name,
            "prompt": PROMPT,
            "max_tokens": 4,
            "logprobs": 2,
            "echo": True,
            "temperature": 0,
            "stream": True,
        },
    ) as response:
        events = [e for e in sse_events(response) if isinstance(e, dict)]
    tokens, logprobs, text = [], [], ""
    for event in events:
        for choice in event["choices"]:
            text += choice["text"]
            if choice.get("logprobs"):
                tokens += choice["logprobs"]["tokens"]
                logprobs += choice["logprobs"]["token_logprobs"]
    assert text == whole["text"] and tokens == whole["logprobs"]["tokens"]
    assert logprobs[0] is None and all(
        math.isclose(a, b, abs_tol=1e-5) for a, b in zip(logprobs[1:], whole["logprobs"]["token_logprobs"][1:])
    )


def test_vllm_prompt_logprobs(http, model_name, openai_client):
    choice = _completion(http, model_name, max_tokens=1, prompt_logprobs=2, logprobs=1, echo=True)["choices"][0]
    prompt = choice["prompt_logprobs"]
    assert prompt[0] is None and len(prompt) == len(choice["logprobs"]["tokens"]) - 1
    for position, entry in enumerate(prompt[1:], start=1):
        assert 1 <= len(entry) <= 3  # the token itself and the top 2
        ranks = sorted(e["rank"] for e in entry.values())
        assert ranks[0] == 1 or len(entry) == 3
        assert any(
            math.isclose(e["logprob"], choice["logprobs"]["token_logprobs"][position], abs_tol=1e-6)
            for e in entry.values()
        )
    chat = http.post(
        "/v1/chat/completions",
        json={
            "model": model_name,
            "max_tokens": 1,
            "prompt_logprobs": 0,
            "messages": [{"role": "user", "content": "Hi"}],
        },
    ).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    assert_error(
        http.post(
            "/v1/completions", json={"model": model_name, "prompt": PROMPT, "prompt_logprobs": 1, "stream": True}
        ),
        400,
        contains="prompt_logprobs",
    )
