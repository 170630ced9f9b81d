"""How requests end when the server stops: a dead engine makes liveness fail and the process exit non-zero
(so compose or Kubernetes restart it); SIGTERM's deadline ends what is still running with an error the
client can read and exits 0; a stream waiting in the queue has its headers and keep-alive comments at once."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from .conftest import assert_error, scrape, sse_events, start_server, wait_until
from .fault_injected_serve import DEVICE_FAULT_SEED

pytestmark = pytest.mark.slow

GRACE_SECONDS = 4
KEEPALIVE_SECONDS = 0.5
LONG = {"prompt": "Tell me everything.", "max_tokens": 900, "ignore_eos": True, "temperature": 0}


def test_a_dead_engine_fails_liveness_and_the_process_exits_non_zero(tmp_path):
    server = start_server(
        tmp_path,
        "--max-model-len",
        "256",
        "--graceful-shutdown-timeout",
        "5",
        module="tests.server.fault_injected_serve",
    )
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            response = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "seed": DEVICE_FAULT_SEED})
            assert assert_error(response, 503)["code"] == "engine_dead"

            def live_fails():
                try:
                    return client.get("/v1/health/live").status_code == 503
                except httpx.TransportError:  # already gone: the process exited
                    return server.process.poll() is not None

            assert wait_until(live_fails, timeout=10)
        assert server.process.wait(30) == 1
        assert "The engine died; the server stops so that it can be restarted." in server.log()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def one_seat_server(tmp_path_factory):
    """One sequence at a time: a second request waits in the queue while the first runs."""
    server = start_server(
        tmp_path_factory.mktemp("one-seat"),
        "--max-num-seqs",
        "1",
        "--max-model-len",
        "1024",
        "--sse-keepalive-seconds",
        str(KEEPALIVE_SECONDS),
        "--graceful-shutdown-timeout",
        str(GRACE_SECONDS),
    )
    yield server
    server.stop()


def test_a_queued_stream_gets_headers_and_keepalives_at_once(one_seat_server):
    with httpx.Client(base_url=one_seat_server.base_url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as running:
            first = running.iter_lines()
            assert next(first).startswith("data: ")  # the long request holds the only seat
            started = time.monotonic()
            with client.stream("POST", "/v1/completions", json={**LONG, "max_tokens": 2, "stream": True}) as queued:
                assert queued.status_code == 200 and queued.headers["content-type"].startswith("text/event-stream")
                lines = queued.iter_lines()
                assert next(lines) == ": queued"  # before its first token: it is waiting for the seat
                waited = time.monotonic() - started
                running.close()  # free the seat; the queued one then runs to its end
                rest = sse_events(lines)
    assert waited < 60
    assert rest[-1] == "[DONE]" and rest[-2]["choices"][0]["finish_reason"] == "length"


def test_sigterm_deadline_ends_what_is_still_running_and_exits_0(one_seat_server):
    """The grace period (4 s) is far shorter than these requests: at its end the running stream, a stream
    still queued and a non-streamed request all end with the `server_shutting_down` error."""
    base = one_seat_server.base_url
    results: dict[str, object] = {}

    def stream(name: str):
        with httpx.Client(base_url=base, timeout=60) as client:
            with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response:
                results[name] = sse_events(response)

    def plain():
        with httpx.Client(base_url=base, timeout=60) as client:
            results["plain"] = client.post("/v1/completions", json=LONG)

    threads = [threading.Thread(target=stream, args=("running",))]
    threads[0].start()
    with httpx.Client(base_url=base, timeout=30) as probe:
        assert wait_until(lambda: scrape(probe)["kiln:num_requests_running"] == 1, timeout=30)
    threads += [threading.Thread(target=stream, args=("queued",)), threading.Thread(target=plain)]
    for thread in threads[1:]:
        thread.start()
    time.sleep(1.0)
    one_seat_server.process.terminate()
    for thread in threads:
        thread.join(GRACE_SECONDS + 30)
    assert one_seat_server.process.wait(GRACE_SECONDS + 30) == 0

    for name in ("running", "queued"):
        events = results[name]
        assert events[-1] == "[DONE]", (name, events[-3:])
        assert events[-2]["error"]["code"] == "server_shutting_down", (name, events[-2])
    plain_error = assert_error(results["plain"], 503)
    assert plain_error["code"] == "server_shutting_down"
    log = one_seat_server.log()
    assert "Shutdown deadline: ending 3 request(s) still in flight" in log
    assert "Traceback" not in log, log[-3000:]
