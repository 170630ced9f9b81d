"""CORS (--allowed-origins): preflights are answered before the API key is checked, real requests still need
the key, and every answer to an allowed origin (401s included) carries Access-Control-Allow-Origin so that a
browser page can read it. Without the flag no CORS header is sent."""

from __future__ import annotations

import httpx
import pytest

from server.cli import main
from server.settings import ServerSettings

from .conftest import assert_error, start_server

ORIGIN = "http://example.com"
KEY = "k"
PREFLIGHT = {
    "Origin": ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
}


def test_origins_are_a_comma_separated_list(monkeypatch):
    monkeypatch.setenv("KILN_ALLOWED_ORIGINS", "https://A.example.com, http://localhost:3000,")
    assert ServerSettings().allowed_origins == ["https://a.example.com", "http://localhost:3000"]
    assert ServerSettings(allowed_origins="*").allowed_origins == ["*"]
    monkeypatch.setenv("KILN_ALLOWED_ORIGINS", "")
    assert ServerSettings().allowed_origins == []


@pytest.mark.parametrize("value", ["example.com", "http://example.com/", "http://example.com/app", '["*"]'])
def test_a_bad_origin_exits_2_naming_the_flag(value, capsys):
    assert main(["serve", "--allowed-origins", value]) == 2
    err = capsys.readouterr().err
    assert "--allowed-origins" in err and "is not an origin" in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def cors_server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("cors"), "--allowed-origins", ORIGIN, api_key=KEY)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(cors_server):
    with httpx.Client(base_url=cors_server.base_url, timeout=300) as client:
        yield client


@pytest.mark.slow
def test_a_preflight_is_answered_without_the_key(client):
    response = client.options("/v1/chat/completions", headers=PREFLIGHT)
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in response.headers["access-control-allow-methods"]
    assert response.headers["access-control-allow-headers"] == PREFLIGHT["Access-Control-Request-Headers"]
    assert "x-request-id" in response.headers


@pytest.mark.slow
def test_a_cross_origin_request_with_the_key_is_allowed(client):
    headers = {"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"}
    models = client.get("/v1/models", headers=headers)
    assert models.status_code == 200, models.text
    model = models.json()["data"][0]["id"]
    response = client.post("/v1/completions", headers=headers, json={"model": model, "prompt": "Hi", "max_tokens": 2})
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "X-Request-Id" in response.headers["access-control-expose-headers"]


@pytest.mark.slow
@pytest.mark.parametrize("authorization", [None, "Bearer wrong"])
def test_without_the_key_it_is_still_401_and_readable_by_the_page(client, authorization):
    headers = {"Origin": ORIGIN, **({"Authorization": authorization} if authorization else {})}
    response = client.post("/v1/chat/completions", headers=headers, json={"messages": []})
    assert_error(response, 401)
    assert response.headers["access-control-allow-origin"] == ORIGIN
    # an OPTIONS that is no preflight is an ordinary request, key and all
    assert client.options("/v1/models", headers={"Origin": ORIGIN}).status_code == 401


@pytest.mark.slow
def test_a_disallowed_origin_gets_no_allow_origin(client):
    preflight = client.options("/v1/chat/completions", headers={**PREFLIGHT, "Origin": "http://evil.example"})
    assert preflight.status_code == 400
    assert "access-control-allow-origin" not in preflight.headers
    response = client.get("/v1/models", headers={"Origin": "http://evil.example", "Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


@pytest.mark.slow
def test_without_the_flag_no_cors_headers_are_sent(live_server, http):
    responses = [
        http.get("/v1/models", headers={"Origin": ORIGIN}),
        httpx.options(f"{live_server.base_url}/v1/chat/completions", headers=PREFLIGHT),
    ]
    assert responses[1].status_code == 401  # no CORS: a preflight is an ordinary OPTIONS, without the key
    for response in responses:
        assert not [name for name in response.headers if name.startswith("access-control-")], response.headers
