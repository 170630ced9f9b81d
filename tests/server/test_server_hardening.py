"""Hostile-but-fair input against the shared live server: numbers that pass a range check but not a
tensor, invalid Unicode, oversized bodies and lists, unauthenticated bodies, the API docs. Each gets a
clear 4xx envelope, and the server goes on serving."""

from __future__ import annotations

import json
import socket
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest

from engines.model_source import resolve_model
from server.offload import LARGE_INPUT_CHARS
from server.prompt_bound import max_token_chars
from server.protocol import MAX_MESSAGES, MAX_STOP_STRINGS

from .conftest import assert_error

pytestmark = pytest.mark.slow

HI = [{"role": "user", "content": "Hi"}]
BIG = 2**63  # one past int64: what broke the sampler's top-k tensor and stopped the engine


def max_token_chars_of_the_default_model() -> int:
    from transformers import AutoTokenizer

    return max_token_chars(AutoTokenizer.from_pretrained(resolve_model(None)))


def assert_still_serving(http, model_name):
    response = http.post("/v1/completions", json={"model": model_name, "prompt": "Hello", "max_tokens": 2})
    assert response.status_code == 200, response.text
    assert http.get("/v1/health/ready").status_code == 200


@pytest.mark.parametrize(
    "field, value",
    [
        ("top_k", BIG),
        ("top_k", 2**63 - 1),
        ("top_k", 10**6),
        ("n", BIG),
        ("seed", 2**64),
        ("seed", -(2**63) - 1),
        ("max_tokens", BIG),
        ("min_tokens", BIG),
        ("logprobs", BIG),
        ("stop_token_ids", [BIG]),
        ("logit_bias", {str(BIG): 1}),
        ("prompt", [BIG]),
        ("best_of", BIG),
        ("temperature", 1e308),
        ("temperature", 1e-300),
        ("top_p", 1e-300),
    ],
)
def test_extreme_numbers_never_reach_the_engine_unchecked(http, model_name, field, value):
    body = {"model": model_name, "prompt": "hi", "max_tokens": 2, field: value}
    response = http.post("/v1/completions", json=body)
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert_error(response, 400)
    assert_still_serving(http, model_name)


def test_huge_top_k_means_no_top_k(http, model_name):
    base = {"model": model_name, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 1, "seed": 7}
    plain = http.post("/v1/completions", json=base).json()["choices"][0]["text"]
    for top_k in (2**63 - 1, 10**9):
        assert http.post("/v1/completions", json={**base, "top_k": top_k}).json()["choices"][0]["text"] == plain
    assert_error(http.post("/v1/completions", json={**base, "top_k": BIG}), 400, contains="top_k")


def test_a_tiny_temperature_is_greedy(http, model_name):
    base = {"model": model_name, "prompt": "Once upon a time", "max_tokens": 12, "ignore_eos": True}
    greedy = http.post("/v1/completions", json={**base, "temperature": 0}).json()["choices"][0]["text"]
    tiny = http.post("/v1/completions", json={**base, "temperature": 1e-300, "seed": 1}).json()["choices"][0]["text"]
    assert tiny == greedy


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": "a\ud800b"}, "prompt"),
        ("/v1/completions", {"prompt": ["fine", "x\udfffy"]}, "prompt.1"),
        ("/v1/completions", {"prompt": "fine", "stop": ["\ud800"]}, "stop.0"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages.0.content"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]},
            "messages.0.content.0.text",
        ),
    ],
)
def test_lone_surrogates_are_400_naming_the_field(http, model_name, path, body, param):
    # json.dumps escapes the surrogate as \\ud800, which is what a client sends
    raw = json.dumps({"model": model_name, "max_tokens": 2, **body})
    response = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    error = assert_error(response, 400, contains="not valid Unicode")
    assert error["param"] == param
    assert "template" not in error["message"]


def test_body_over_the_limit_is_413_before_it_is_read(http, model_name):
    prompt = "word " * (9 * 2**20 // 5)  # 9 MiB, over the default 8 MiB
    error = assert_error(http.post("/v1/completions", json={"model": model_name, "prompt": prompt}), 413)
    assert error["code"] == "request_too_large" and "8388608 bytes" in error["message"]
    assert_still_serving(http, model_name)


def test_chunked_body_over_the_limit_is_413(http, model_name):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(9 * 16):  # 9 MiB in 64 KiB pieces, without a Content-Length
            yield b"x" * 65536
        yield b'"}'

    response = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(response, 413)
    assert_still_serving(http, model_name)


def raw_request_headers_only(base_url: str, path: str, headers: dict[str, str], timeout: float) -> bytes:
    """Send a request's headers announcing a large body, send none of it, and return the first bytes of
    the reply (b"" when the server waits for the body)."""
    url = urlparse(base_url)
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {url.netloc}",
        "Content-Type: application/json",
        "Content-Length: 5000000",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    with socket.create_connection((url.hostname, url.port), timeout=timeout) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        try:
            return sock.recv(4096)
        except TimeoutError:
            return b""


def test_unauthenticated_body_gets_401_unread(live_server):
    reply = raw_request_headers_only(live_server.base_url, "/v1/chat/completions", {}, timeout=10)
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
    reply = raw_request_headers_only(
        live_server.base_url, "/v1/completions", {"Authorization": "Bearer wrong"}, timeout=10
    )
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]


def test_too_many_messages_and_stop_strings_are_400(http, model_name):
    messages = [{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1)
    error = assert_error(http.post("/v1/chat/completions", json={"model": model_name, "messages": messages}), 400)
    assert error["param"] == "messages" and str(MAX_MESSAGES) in error["message"]
    stops = [f"stop{i}" for i in range(MAX_STOP_STRINGS + 1)]
    error = assert_error(http.post("/v1/completions", json={"model": model_name, "prompt": "hi", "stop": stops}), 400)
    assert error["param"] == "stop"


def test_api_docs_need_the_key(live_server, http):
    with httpx.Client(base_url=live_server.base_url, timeout=30) as anonymous:
        for path in ("/docs", "/redoc", "/openapi.json", "/v1/models", "/v1/metadata"):
            assert_error(anonymous.get(path), 401)
        for path in ("/v1/health/live", "/v1/health/ready", "/health", "/metrics"):
            assert anonymous.get(path).status_code == 200, path
    assert http.get("/openapi.json").json()["info"]["title"] == "kiln"
    assert http.get("/docs").status_code == 200


def test_a_prompt_longer_than_any_context_is_refused_untokenized(http, model_name):
    max_model_len = http.get("/v1/models").json()["data"][0]["max_model_len"]
    prompt = "x" * (max_model_len * 200)  # no token of the model holds 200 characters
    for path, body in (
        ("/v1/completions", {"prompt": prompt}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}),
    ):
        started = time.monotonic()
        error = assert_error(
            http.post(path, json={"model": model_name, **body}),
            400,
            contains=f"maximum context length is {max_model_len} tokens",
        )
        assert error["code"] == "context_length_exceeded" and "characters" in error["message"]
        assert time.monotonic() - started < 10  # tokenizing it would take tens of seconds


def test_large_prompts_are_tokenized_off_the_event_loop(http, model_name):
    """A prompt this size is tokenized on a worker thread: health answers at once while it runs. (The
    latencies under load are measured by bench/event_loop.py; here only that live answers at all while a
    request that takes a second or more to tokenize is in flight.)"""
    max_model_len = http.get("/v1/models").json()["data"][0]["max_model_len"]
    size = min(2 * 2**20, max_model_len * max_token_chars_of_the_default_model() - 1)
    prompt = ("lorem ipsum dolor " * (size // 18 + 1))[:size]  # short enough to be tokenized, not refused unread
    assert len(prompt) > LARGE_INPUT_CHARS
    done = threading.Event()
    result = {}

    def big():
        result["response"] = http.post("/v1/completions", json={"model": model_name, "prompt": prompt})
        done.set()

    thread = threading.Thread(target=big)
    thread.start()
    answered_while_busy = 0
    with httpx.Client(base_url=http.base_url, timeout=30) as probe:
        while not done.is_set():
            started = time.monotonic()
            probe.get("/v1/health/live")
            if not done.is_set() and time.monotonic() - started < 0.5:
                answered_while_busy += 1
            time.sleep(0.02)
    thread.join()
    assert_error(result["response"], 400, contains="maximum context length")
    assert answered_while_busy >= 5
