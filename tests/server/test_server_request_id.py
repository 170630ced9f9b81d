"""X-Request-Id: a usable client id comes back on every response (errors, 401, 413, streams, health), others
are replaced by a generated one, the same id twice at once does not collide in the engine, and the id is in
the server's log lines of the request."""

from __future__ import annotations

import asyncio
import re
import threading
import uuid

import httpx
import pytest

from server.app import create_app
from server.request_id import usable
from server.settings import ServerSettings

from .conftest import assert_error, sse_events, wait_until

GENERATED = re.compile(r"[0-9a-f]{32}")


@pytest.mark.parametrize(
    "value, ok",
    [
        ("abc-123_X.y:z/=", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("", False),
        ("a b", False),
        ("a\tb", False),
        ("a\x7fb", False),
        ("caf\xe9", False),
    ],
)
def test_usable_ids_are_short_visible_ascii(value, ok):
    assert usable(value) is ok


def test_an_unexpected_500_carries_the_id_and_cors_headers():
    # The middleware sits outside Starlette's ServerErrorMiddleware, which answers the 500 itself.
    app = create_app(ServerSettings(allowed_origins="http://example.com"))

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://kiln") as client:
            return await client.get("/boom", headers={"X-Request-Id": "bug-1", "Origin": "http://example.com"})

    response = asyncio.run(get())
    assert_error(response, 500)
    assert response.headers["x-request-id"] == "bug-1"
    assert response.headers["access-control-allow-origin"] == "http://example.com"


def sent_id() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["200", "400", "401", "404 endpoint", "404 model", "413", "live", "ready"])
def test_the_sent_id_comes_back(live_server, http, model_name, case):
    rid = sent_id()
    headers = {"X-Request-Id": rid}
    completion = {"model": model_name, "prompt": "Hi", "max_tokens": 2}
    if case == "200":
        response = http.post("/v1/completions", json=completion, headers=headers)
    elif case == "400":
        response = http.post("/v1/completions", json={**completion, "max_tokens": -1}, headers=headers)
    elif case == "401":
        response = httpx.post(f"{live_server.base_url}/v1/completions", json=completion, headers=headers)
    elif case == "404 endpoint":
        response = http.get("/v1/nothing", headers=headers)
    elif case == "404 model":
        response = http.post("/v1/completions", json={**completion, "model": "no-such-model"}, headers=headers)
    elif case == "413":
        response = http.post("/v1/completions", content=b"x" * (9 * 2**20), headers=headers)
    else:
        response = http.get(f"/v1/health/{case}", headers=headers)
    expected = {"200": 200, "400": 400, "401": 401, "413": 413, "live": 200, "ready": 200}.get(case, 404)
    assert response.status_code == expected, response.text
    assert response.headers["x-request-id"] == rid


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_stream_carries_the_id(http, model_name, path):
    rid = sent_id()
    body = {
        "model": model_name,
        "max_tokens": 3,
        "stream": True,
        **({"prompt": "Hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]}),
    }
    with http.stream("POST", path, json=body, headers={"X-Request-Id": rid}) as response:
        assert response.status_code == 200
        assert response.headers["x-request-id"] == rid
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert not events[0]["id"].startswith(rid)  # the OpenAI response id keeps its own format


@pytest.mark.slow
def test_a_missing_id_is_generated(http):
    first, second = (http.get("/v1/models").headers["x-request-id"] for _ in range(2))
    assert GENERATED.fullmatch(first) and GENERATED.fullmatch(second) and first != second


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["x" * 129, "a\tb", "with space", b"caf\xe9"])
def test_an_unusable_id_is_replaced_without_failing_the_request(http, bad):
    response = http.get("/v1/models", headers={"X-Request-Id": bad})
    assert response.status_code == 200
    assert GENERATED.fullmatch(response.headers["x-request-id"])


@pytest.mark.slow
def test_the_same_id_twice_at_once_does_not_collide_in_the_engine(http, model_name):
    rid = sent_id()
    body = {"model": model_name, "prompt": "Count: one, two,", "max_tokens": 24, "ignore_eos": True}
    results = []

    def post():
        results.append(http.post("/v1/completions", json=body, headers={"X-Request-Id": rid}))

    threads = [threading.Thread(target=post) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert [r.status_code for r in results] == [200, 200], [r.text for r in results]
    assert all(r.json()["usage"]["completion_tokens"] == 24 for r in results)
    assert results[0].json()["id"] != results[1].json()["id"]


@pytest.mark.slow
def test_the_id_is_in_the_log_lines_of_its_request(live_server, http, model_name):
    rid = sent_id()
    body = {"model": model_name, "prompt": "Hi", "max_tokens": 5, "ignore_eos": True}
    assert http.post("/v1/completions", json=body, headers={"X-Request-Id": rid}).status_code == 200
    lines = wait_until(lambda: [line for line in live_server.log().splitlines() if line.endswith(f" request_id={rid}")])
    assert any(
        re.search(
            rf"Engine requests {re.escape(rid)}-\d+-\* ended after [0-9.]+ s \(length\): "
            r"\d+ prompt, 5 completion tokens",
            line,
        )
        for line in lines
    ), lines
    assert any('"POST /v1/completions HTTP/1.1" 200' in line for line in lines), lines  # the access log
