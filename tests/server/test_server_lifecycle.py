"""A second, small server (no API key, tiny context, one sequence at a time): readiness while
loading, open access, the default max_tokens, 429 when the queue is full, graceful SIGTERM."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from .conftest import CLEAN_EXIT, assert_error, scrape, sse_events, start_server, wait_until

pytestmark = pytest.mark.slow

NAME = "tiny-test"
CONTEXT = 64
HI = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    server = start_server(
        tmp_path_factory.mktemp("small"),
        "--served-model-name",
        NAME,
        "--max-model-len",
        str(CONTEXT),
        "--max-num-seqs",
        "1",
        "--max-num-waiting",
        "1",
        "--kv-cache-memory",
        "64MiB",
        "--graceful-shutdown-timeout",
        "20",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(small_server):
    with httpx.Client(base_url=small_server.base_url, timeout=300) as client:
        yield client


def test_live_answers_while_the_model_loads(small_server):
    assert (200, 503) in small_server.load_observations
    assert small_server.load_observations[-1] == (200, 200)


def test_no_api_key_means_open_and_served_name_applies(client):
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [NAME]
    response = client.post("/v1/chat/completions", json={"model": NAME, "messages": HI, "max_tokens": 3})
    assert response.status_code == 200 and response.json()["model"] == NAME
    assert_error(client.post("/v1/chat/completions", json={"model": "SmolLM2-135M-Instruct", "messages": HI}), 404)


def test_chat_without_max_tokens_and_completions_with_null_fill_the_context(client):
    """(Completions without max_tokens stop at 16, OpenAI's default: test_server_tokenize.py.)"""
    for path, body in (
        ("/v1/chat/completions", {"messages": HI}),
        ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": None}),
    ):
        response = client.post(path, json={**body, "ignore_eos": True, "temperature": 0}).json()
        assert response["choices"][0]["finish_reason"] == "length"
        assert response["usage"]["total_tokens"] == CONTEXT


def test_full_queue_is_429(small_server, client):
    long = {"prompt": "Hi", "max_tokens": 60, "ignore_eos": True, "stream": True}
    results = {}

    def waiting_request():
        with httpx.Client(base_url=small_server.base_url, timeout=300) as other:
            results["waiting"] = other.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2})

    with httpx.Client(base_url=small_server.base_url, timeout=300) as runner:
        with runner.stream("POST", "/v1/completions", json=long) as running:
            lines = running.iter_lines()  # keep a reference: a dropped iterator closes the connection
            next(lines)
            assert scrape(client)["kiln:num_requests_running"] == 1
            thread = threading.Thread(target=waiting_request)
            thread.start()
            assert wait_until(lambda: scrape(client)["kiln:num_requests_waiting"] == 1, timeout=60)
            error = assert_error(client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2}), 429)
            assert error["code"] == "engine_overloaded"
    thread.join(60)
    assert results["waiting"].status_code == 200  # it ran once the long one was cancelled


def test_sigterm_lets_inflight_streams_finish(small_server):
    body = {"prompt": "Hi", "max_tokens": 30, "ignore_eos": True, "stream": True, "temperature": 0}
    with httpx.Client(base_url=small_server.base_url, timeout=300) as client:
        with client.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            first = next(lines)
            assert first.startswith("data: ")
            small_server.process.terminate()
            rest = sse_events(lines)
    assert rest[-1] == "[DONE]"
    finishes = [e["choices"][0]["finish_reason"] for e in rest[:-1] if e["choices"]]
    assert finishes[-1] == "length"
    started = time.monotonic()
    assert small_server.process.wait(30) in CLEAN_EXIT
    assert time.monotonic() - started < 30
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{small_server.base_url}/v1/health/live", timeout=2)
    log = small_server.log()
    assert "Traceback" not in log and "Application shutdown complete" in log
