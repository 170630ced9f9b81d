"""--log-format json: every line a live `kiln serve` writes, from loading to its exit after SIGTERM, is one JSON
object with timestamp, level, logger and message; a request's lines (kiln's and uvicorn's access log) carry its
request id."""

from __future__ import annotations

import json
import uuid
from datetime import datetime

import httpx
import pytest

from tests.server.conftest import start_server, wait_until

pytestmark = pytest.mark.slow


def test_every_line_of_a_json_logging_server_is_a_json_object(tmp_path):
    server = start_server(tmp_path, "--log-format", "json")
    request_id = f"json-log-{uuid.uuid4().hex}"
    try:
        with httpx.Client(base_url=server.base_url, timeout=300) as client:
            body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
            response = client.post("/v1/chat/completions", json=body, headers={"X-Request-Id": request_id})
            assert response.status_code == 200, response.text
            refused = client.post("/v1/completions", json={"prompt": "x", "max_tokens": -1})
            assert refused.status_code == 400
            wait_until(lambda: f'"request_id": "{request_id}"' in server.log() and "/v1/completions" in server.log())
    finally:
        assert server.stop() == 0, server.log()

    lines = server.log().splitlines()
    assert lines, "the server wrote nothing"
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}")
    for entry in entries:
        assert isinstance(entry, dict) and {"timestamp", "level", "logger", "message"} <= set(entry), entry
        assert datetime.fromisoformat(entry["timestamp"]).tzinfo is not None, entry

    mine = [e for e in entries if e.get("request_id") == request_id]
    loggers = {e["logger"] for e in mine}
    assert {"kiln.server", "uvicorn.access"} <= loggers, mine
    (access,) = [e for e in mine if e["logger"] == "uvicorn.access"]
    assert access["method"] == "POST" and access["path"] == "/v1/chat/completions" and access["status"] == 200
    # startup and shutdown (outside any request) have no request id; uvicorn's lines are there too
    assert any(e["logger"] == "uvicorn.error" and "request_id" not in e for e in entries)
    assert any("Shutting down" in e["message"] for e in entries)
