"""The app without a model: request validation (400 in OpenAI's envelope, never 422), auth, health
while loading, error mapping. These run against the ASGI app in-process; no engine is loaded."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from engines.base import EngineDeadError, EngineOverloadedError
from server.app import create_app
from server.engine_state import EngineHolder
from server.errors import from_exception
from server.settings import ServerSettings

from .conftest import assert_error


def client_for(**settings) -> httpx.Client:
    # ASGITransport runs no lifespan, so the app never starts loading a model.
    app = create_app(ServerSettings(**settings))
    return _SyncASGIClient(app)


class _SyncASGIClient:
    """Blocking facade over httpx.AsyncClient + ASGITransport for short unit tests."""

    def __init__(self, app):
        self.app = app

    def request(self, method: str, url: str, **kwargs) -> httpx.Response:
        async def go():
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://kiln") as client:
                return await client.request(method, url, **kwargs)

        return asyncio.run(go())

    def get(self, url, **kwargs):
        return self.request("GET", url, **kwargs)

    def post(self, url, **kwargs):
        return self.request("POST", url, **kwargs)


@pytest.fixture(scope="module")
def app_client():
    return client_for()


@pytest.mark.parametrize(
    "body, contains",
    [
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
        ({"messages": []}, "messages"),
        ({}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": "many"}, "'n'"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 1.5}, "'n'"),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": ["", "x"]}, "stop strings must not be empty"),
        ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"messages": [{"role": "user", "content": 5}]}, "content"),
        ({"messages": "hello"}, "messages"),
    ],
)
def test_invalid_chat_bodies_are_400(app_client, body, contains):
    assert_error(app_client.post("/v1/chat/completions", json=body), 400, contains=contains)


@pytest.mark.parametrize(
    "body, contains",
    [
        ({"prompt": []}, "empty"),
        ({"prompt": [[]]}, "non-empty"),
        ({"prompt": ["a", 1]}, "prompt must be"),
        ({"prompt": {"text": "a"}}, "prompt must be"),
        ({}, "prompt"),
    ],
)
def test_invalid_completion_bodies_are_400(app_client, body, contains):
    assert_error(app_client.post("/v1/completions", json=body), 400, contains=contains)


def test_malformed_json_is_400(app_client):
    response = app_client.post(
        "/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"}
    )
    assert_error(response, 400, contains="not valid JSON")
    response = app_client.post("/v1/chat/completions", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert_error(response, 400, contains="JSON object")


def test_non_json_content_type_is_400(app_client):
    response = app_client.post(
        "/v1/chat/completions", content=b"messages=hi", headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert_error(response, 400, contains="Content-Type: application/json")


def test_unknown_route_and_method_in_envelope(app_client):
    assert_error(app_client.get("/v1/nothing-here"), 404)
    assert_error(app_client.request("DELETE", "/v1/models"), 405)


def test_not_ready_while_loading(app_client):
    live = app_client.get("/v1/health/live")
    assert live.status_code == 200 and live.json()["status"] == "live"
    for path in ("/v1/health/ready", "/health"):
        ready = app_client.get(path)
        assert ready.status_code == 503 and ready.json()["status"] == "loading"
    assert_error(app_client.get("/v1/models"), 503, contains="loading")
    body = {"messages": [{"role": "user", "content": "hi"}]}
    error = assert_error(app_client.post("/v1/chat/completions", json=body), 503)
    assert error["code"] == "engine_not_ready"
    assert app_client.get("/v1/version").status_code == 200
    assert app_client.get("/metrics").status_code == 200


def test_api_key_required_when_set():
    client = client_for(api_key="secret")
    assert_error(client.get("/v1/version"), 401, contains="Missing API key")
    assert_error(client.get("/v1/version", headers={"Authorization": "Bearer wrong"}), 401, contains="Incorrect")
    assert_error(client.get("/v1/models", headers={"Authorization": "Basic secret"}), 401)
    assert client.get("/v1/version", headers={"Authorization": "Bearer secret"}).status_code == 200
    # a valid key gets past auth to the next answer (the model is not loaded here)
    assert client.get("/v1/models", headers={"Authorization": "Bearer secret"}).status_code == 503
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert_error(client.post("/v1/chat/completions", json=body), 401)
    assert_error(client.post("/v1/completions", json={"prompt": "hi"}), 401)
    for open_path in ("/v1/health/live", "/metrics"):
        assert client.get(open_path).status_code == 200
    assert client.get("/v1/health/ready").status_code == 503  # open, just not ready


def test_api_key_off_means_open():
    client = client_for()
    assert client.get("/v1/version").status_code == 200


def test_readiness_is_503_draining_once_sigterm_is_handled():
    app = create_app(ServerSettings())
    client = _SyncASGIClient(app)
    assert client.get("/v1/health/ready").json()["status"] == "loading"
    # what KilnServer.handle_exit does on SIGTERM (the deadline it schedules is not reached here)
    asyncio.run(_end_after(app.state.in_flight, grace_period=60))
    for path in ("/v1/health/ready", "/health"):
        response = client.get(path)
        assert response.status_code == 503 and response.json()["status"] == "draining", response.text
    assert client.get("/v1/health/live").status_code == 200  # draining is not dead: no restart


async def _end_after(in_flight, grace_period: float) -> None:
    in_flight.end_after(asyncio.get_running_loop(), grace_period)
    await asyncio.sleep(0)


def test_engine_errors_map_to_statuses():
    overloaded = from_exception(EngineOverloadedError("The server is busy."))
    assert (overloaded.status_code, overloaded.type) == (429, "rate_limit_error")
    dead = from_exception(EngineDeadError("The engine stopped."))
    assert (dead.status_code, dead.code) == (503, "engine_dead")
    assert from_exception(ValueError("bad value")).status_code == 400
    assert from_exception(RuntimeError("bug")).status_code == 500


def test_dead_engine_is_not_ready():
    class StoppedEngine:  # only what EngineHolder reads of an engine whose step loop has ended
        is_alive = False
        tokenizer = None

    holder = EngineHolder(engine=StoppedEngine())
    assert holder.status()[0] == "dead"
    with pytest.raises(Exception) as raised:
        holder.get()
    assert raised.value.status_code == 503 and raised.value.code == "engine_dead"


def test_a_request_accepted_while_draining_is_503_and_starts_nothing():
    """Between SIGTERM and uvicorn closing its listener (its next tick), a connection can still be accepted: that
    request must not start work the grace period is meant to end."""
    from types import SimpleNamespace

    from server.errors import APIError
    from server.respond import start_in_flight
    from server.shutdown import InFlight

    class Unstarted:  # a Generation as far as start_in_flight touches it before submitting
        started = False

        async def start(self):
            self.started = True

    in_flight = InFlight()
    in_flight.draining = True
    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(in_flight=in_flight, tracer=None)))
    generation = Unstarted()
    with pytest.raises(APIError) as raised:
        asyncio.run(start_in_flight(request, generation))
    assert (raised.value.status_code, raised.value.code) == (503, "server_shutting_down")
    assert not generation.started and len(in_flight) == 0
