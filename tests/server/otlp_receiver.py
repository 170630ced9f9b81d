"""A real OTLP/HTTP trace receiver on loopback for the tracing tests: it decodes each POST /v1/traces body as an
ExportTraceServiceRequest (opentelemetry-proto, protobuf) and keeps the spans with their resource's attributes."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

try:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )
except ImportError:  # the test fails with this, it does not skip
    ExportTraceServiceRequest = ExportTraceServiceResponse = None


@dataclass
class ReceivedSpan:
    name: str
    kind: int
    trace_id: str  # hex, as in a traceparent header
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    status_code: int
    attributes: dict[str, Any]
    resource: dict[str, Any]


def _value(any_value) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind)


def _attributes(key_values) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in key_values}


class OtlpReceiver:
    def __init__(self):
        if ExportTraceServiceRequest is None:
            pytest.fail("the tracing tests need opentelemetry-proto: install kiln with the tracing extra")
        self.spans: list[ReceivedSpan] = []
        self.posts = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                receiver._add(request, self.path, self.headers.get("Content-Type"))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):  # quiet: pytest shows the test's own output
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _add(self, request, path: str, content_type: str | None) -> None:
        assert path == "/v1/traces" and content_type == "application/x-protobuf", (path, content_type)
        with self._lock:
            self.posts += 1
            for resource_spans in request.resource_spans:
                resource = _attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(
                            ReceivedSpan(
                                name=span.name,
                                kind=span.kind,
                                trace_id=span.trace_id.hex(),
                                span_id=span.span_id.hex(),
                                parent_span_id=span.parent_span_id.hex(),
                                start_ns=span.start_time_unix_nano,
                                end_ns=span.end_time_unix_nano,
                                status_code=span.status.code,
                                attributes=_attributes(span.attributes),
                                resource=resource,
                            )
                        )

    def span_of(self, request_id: str) -> ReceivedSpan | None:
        with self._lock:
            found = [s for s in self.spans if s.attributes.get("gen_ai.request.id") == request_id]
        assert len(found) <= 1, f"{len(found)} spans for request {request_id}"
        return found[0] if found else None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
