"""--otlp-traces-endpoint: a live `kiln serve` sends one span per request to a real OTLP/HTTP receiver (protobuf
decoded with opentelemetry-proto), with vLLM's span name and gen_ai.* attributes, the request id of the
response, the engine's timings in order, the client's trace context as parent; a dead collector breaks nothing."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time

import httpx
import pytest

from tests.server.conftest import REPO, free_port, sse_events, start_server, wait_until
from tests.server.otlp_receiver import OtlpReceiver, ReceivedSpan

pytestmark = pytest.mark.slow

SPAN_KIND_SERVER = 2  # opentelemetry.proto.trace.v1.Span.SpanKind
STATUS_CODE_ERROR = 2
SERVICE_NAME = "kiln-under-test"
EXPORT_TIMEOUT_S = 3
# Export quickly (the SDK's default waits 5 s between batches), over OTLP/HTTP to the receiver.
OTEL_ENV = {
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
    "OTEL_BSP_SCHEDULE_DELAY": "100",
    "OTEL_SERVICE_NAME": SERVICE_NAME,
}


@pytest.fixture(scope="module")
def receiver():
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


def _server_with(tmp_path_factory, endpoint: str, env: dict[str, str], *args: str):
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        return start_server(tmp_path_factory.mktemp("tracing"), "--otlp-traces-endpoint", endpoint, *args)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def traced(tmp_path_factory, receiver):
    server = _server_with(tmp_path_factory, receiver.endpoint, OTEL_ENV)
    with httpx.Client(base_url=server.base_url, timeout=300) as client:
        yield client
    assert server.stop() == 0, server.log()


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def span_for(receiver: OtlpReceiver, request_id: str) -> ReceivedSpan:
    span = wait_until(lambda: receiver.span_of(request_id), timeout=20)
    assert span is not None, f"no span for request {request_id}; received {len(receiver.spans)} spans"
    return span


def check_span(span: ReceivedSpan, usage: dict, finish_reasons: list[str]) -> None:
    a = span.attributes
    assert span.name == "llm_request" and span.kind == SPAN_KIND_SERVER
    assert span.resource["service.name"] == SERVICE_NAME
    assert a["gen_ai.usage.prompt_tokens"] == usage["prompt_tokens"]
    assert a["gen_ai.usage.completion_tokens"] == usage["completion_tokens"]
    assert a["gen_ai.response.finish_reasons"] == finish_reasons
    assert a["gen_ai.response.model"] == a["gen_ai.request.model"] and a["gen_ai.request.model"]
    queue, ttft = a["gen_ai.latency.time_in_queue"], a["gen_ai.latency.time_to_first_token"]
    e2e = a["gen_ai.latency.e2e"]
    assert 0 <= queue <= ttft <= e2e, (queue, ttft, e2e)
    prefill, decode = a["gen_ai.latency.time_in_model_prefill"], a["gen_ai.latency.time_in_model_decode"]
    assert prefill >= 0 and decode >= 0
    assert queue + prefill == pytest.approx(ttft, abs=1e-6)
    assert ttft + decode == pytest.approx(e2e, abs=1e-6)
    # the span lasts from arrival to the last token: its duration is e2e
    assert (span.end_ns - span.start_ns) / 1e9 == pytest.approx(e2e, abs=1e-3)


def test_chat_span_continues_the_callers_trace(traced, receiver):
    header, trace_id, parent_id = traceparent()
    body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "temperature": 0.5}
    response = traced.post("/v1/chat/completions", json=body, headers={"traceparent": header})
    assert response.status_code == 200, response.text
    span = span_for(receiver, response.headers["x-request-id"])
    check_span(span, response.json()["usage"], [response.json()["choices"][0]["finish_reason"]])
    assert span.trace_id == trace_id and span.parent_span_id == parent_id and span.span_id != parent_id
    assert span.attributes["gen_ai.request.max_tokens"] == 8
    assert span.attributes["gen_ai.request.temperature"] == 0.5
    assert span.attributes["gen_ai.request.n"] == 1


def test_a_request_without_trace_context_starts_a_trace(traced, receiver):
    response = traced.post("/v1/completions", json={"prompt": "Once upon", "max_tokens": 5, "n": 2})
    assert response.status_code == 200, response.text
    span = span_for(receiver, response.headers["x-request-id"])
    check_span(span, response.json()["usage"], [c["finish_reason"] for c in response.json()["choices"]])
    assert span.parent_span_id == "" and len(span.trace_id) == 32
    assert span.attributes["gen_ai.usage.num_sequences"] == 2


def test_streaming_chat_span(traced, receiver):
    header, trace_id, _ = traceparent()
    body = {
        "messages": [{"role": "user", "content": "Count to five."}],
        "max_tokens": 12,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with traced.stream("POST", "/v1/chat/completions", json=body, headers={"traceparent": header}) as response:
        assert response.status_code == 200
        events = sse_events(response)
    usage = events[-2]["usage"]
    assert usage["completion_tokens"] == 12
    span = span_for(receiver, response.headers["x-request-id"])
    check_span(span, usage, ["length"])
    assert span.trace_id == trace_id


def test_responses_spans_streaming_or_not(traced, receiver):
    for stream in (False, True):
        header, trace_id, parent_id = traceparent()
        body = {"input": "Name a colour.", "max_output_tokens": 6, "stream": stream}
        with traced.stream("POST", "/v1/responses", json=body, headers={"traceparent": header}) as response:
            assert response.status_code == 200
            if stream:
                events = sse_events(response)
                final = events[-1]["response"]
            else:
                response.read()
                final = response.json()
        span = span_for(receiver, response.headers["x-request-id"])
        usage = {"prompt_tokens": final["usage"]["input_tokens"], "completion_tokens": final["usage"]["output_tokens"]}
        check_span(span, usage, ["length"] if final["status"] == "incomplete" else ["stop"])
        assert span.trace_id == trace_id and span.parent_span_id == parent_id


def test_a_dead_collector_breaks_no_request_and_is_logged_once(tmp_path_factory):
    dead = f"http://127.0.0.1:{free_port()}/v1/traces"  # nothing listens there
    env = OTEL_ENV | {"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": str(EXPORT_TIMEOUT_S)}
    server = _server_with(tmp_path_factory, dead, env)
    try:
        with httpx.Client(base_url=server.base_url, timeout=300) as client:
            for i in range(3):
                response = client.post("/v1/completions", json={"prompt": f"Number {i}", "max_tokens": 4})
                assert response.status_code == 200, response.text
                # its span's export is retried once (the exporter's first backoff is about 1 s) and fails within
                # the export timeout, before the next request's
                wait_until(lambda: "Could not export" in server.log(), timeout=10)
                time.sleep(EXPORT_TIMEOUT_S + 0.5)
            streamed = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "stream": True})
            assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    finally:
        assert server.stop() == 0, server.log()
    log = server.log()
    assert log.count("Could not export") == 1, log
    assert "Connection refused" in log  # the reason, from the exporter's own message
    assert "opentelemetry.exporter" not in log  # the exporter's per-batch lines are held back


def test_tracing_without_the_packages_is_one_sentence():
    """The flag refuses to start when the OpenTelemetry SDK is missing (its import is hidden here)."""
    code = (
        "import sys; sys.modules['opentelemetry.sdk.trace'] = None; "
        "from server.cli import main; sys.exit(main(['serve', '--otlp-traces-endpoint', 'http://127.0.0.1:4317']))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "kiln serve: --otlp-traces-endpoint needs the OpenTelemetry packages: install kiln with the tracing extra "
        "(pip install 'kiln[tracing]')."
    )
