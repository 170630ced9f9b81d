"""Between SIGTERM and exit, with a stream in flight: a load balancer's readiness check must not see 200 (the
replica leaves the rotation), new requests are not served, and the stream in flight runs to its end."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from .conftest import sse_events, start_server

pytestmark = pytest.mark.slow

# far longer than the stream, even on a loaded 2-core machine (a few tokens a second): it must end by itself
GRACE_SECONDS = 120
STREAM = {"prompt": "Tell me a long story.", "max_tokens": 64, "ignore_eos": True, "stream": True}


def outcome(method: str, url: str, **kwargs) -> int | str:
    """The status of a request on a new connection (as a kubelet's probe or a load balancer's health check
    makes), or the transport error's name (e.g. ConnectError)."""
    try:
        return httpx.request(method, url, timeout=30, **kwargs).status_code
    except httpx.TransportError as exc:
        return type(exc).__name__


def test_during_the_drain_readiness_fails_and_the_stream_in_flight_finishes(tmp_path):
    server = start_server(tmp_path, "--graceful-shutdown-timeout", str(GRACE_SECONDS))
    events: list = []
    first_chunk = threading.Event()

    def stream():
        with httpx.Client(base_url=server.base_url, timeout=300) as client:
            with client.stream("POST", "/v1/completions", json=STREAM) as response:
                lines = response.iter_lines()
                for line in lines:
                    if line.startswith("data: "):
                        first_chunk.set()
                        events.extend(sse_events(iter([line])))
                        break
                events.extend(sse_events(lines))

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        assert first_chunk.wait(120), server.log()
        server.process.terminate()
        seen: list[tuple[str, int | str]] = []
        while server.process.poll() is None and thread.is_alive():
            seen.append(("ready", outcome("GET", f"{server.base_url}/v1/health/ready")))
            new = {"prompt": "Hi", "max_tokens": 2}
            seen.append(("new", outcome("POST", f"{server.base_url}/v1/completions", json=new)))
            time.sleep(0.1)
        thread.join(GRACE_SECONDS)
        assert server.process.wait(GRACE_SECONDS) == 0, server.log()
    finally:
        server.stop()
        thread.join(5)

    assert seen, "the stream ended before anything was probed"
    assert all(result != 200 for _, result in seen), seen
    readiness = {result for kind, result in seen if kind == "ready"}
    # refused (uvicorn closed its listener), or 503 "draining" in the moment before it does
    assert readiness <= {"ConnectError", 503}, seen
    assert events[-1] == "[DONE]", events[-3:]
    assert not [e for e in events[:-1] if "error" in e], events[-3:]
    finished = [e for e in events[:-1] if e["choices"][0]["finish_reason"]]
    assert finished and finished[-1]["choices"][0]["finish_reason"] == "length", events[-3:]
    assert sum(1 for e in events[:-1] if e["choices"][0]["text"] is not None) >= 2
