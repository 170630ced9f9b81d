"""OpenTelemetry tracing (`--otlp-traces-endpoint`): one span per API request that reached the engine, named
and attributed as vLLM's (`llm_request`, SERVER, gen_ai.* attributes), so that dashboards built for vLLM's
traces read kiln's. The span continues the W3C trace context (`traceparent`, `tracestate`) the client sent.

Spans are built when a request ends, from the engine's timings (the same ones the Prometheus histograms
observe), and handed to a BatchSpanProcessor: exporting happens in its thread, a full queue drops spans, and a
collector that is down or refuses them is logged once (not once per batch) until an export succeeds again.

The OpenTelemetry packages are the `tracing` extra, imported only when the endpoint is set. The exporter is
OTLP over gRPC unless OTEL_EXPORTER_OTLP_TRACES_PROTOCOL (or OTEL_EXPORTER_OTLP_PROTOCOL) says http/protobuf,
vLLM's choice; the other standard OTEL_* variables (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES,
OTEL_EXPORTER_OTLP_TRACES_HEADERS, OTEL_BSP_*, ...) are the SDK's own and apply as usual.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from engines.base import RequestTimings
from server.generation import Generation

logger = logging.getLogger("kiln.tracing")

SPAN_NAME = "llm_request"  # vLLM's
TRACE_HEADERS = ("traceparent", "tracestate")
PROTOCOLS = ("grpc", "http/protobuf")
DEFAULT_SERVICE_NAME = "kiln"
SHUTDOWN_TIMEOUT_MS = 2000  # spans still queued at exit get this long to go out, not the SDK's 30 s

# vLLM's attribute names (vllm/tracing.py SpanAttributes); finish_reasons is the semantic conventions'.
REQUEST_ID = "gen_ai.request.id"
REQUEST_MODEL = "gen_ai.request.model"
RESPONSE_MODEL = "gen_ai.response.model"
REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
REQUEST_TEMPERATURE = "gen_ai.request.temperature"
REQUEST_TOP_P = "gen_ai.request.top_p"
REQUEST_N = "gen_ai.request.n"
USAGE_PROMPT_TOKENS = "gen_ai.usage.prompt_tokens"
USAGE_COMPLETION_TOKENS = "gen_ai.usage.completion_tokens"
USAGE_NUM_SEQUENCES = "gen_ai.usage.num_sequences"
RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
LATENCY_TIME_IN_QUEUE = "gen_ai.latency.time_in_queue"
LATENCY_TIME_TO_FIRST_TOKEN = "gen_ai.latency.time_to_first_token"
LATENCY_E2E = "gen_ai.latency.e2e"
LATENCY_PREFILL = "gen_ai.latency.time_in_model_prefill"
LATENCY_DECODE = "gen_ai.latency.time_in_model_decode"
LATENCY_INFERENCE = "gen_ai.latency.time_in_model_inference"

MISSING_PACKAGES = (
    "--otlp-traces-endpoint needs the OpenTelemetry packages: install kiln with the tracing extra "
    "(pip install 'kiln[tracing]')."
)


def protocol_from_environment() -> str:
    return (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    )


def check_available() -> str | None:
    """None when tracing can start; else the one sentence that says why not."""
    try:
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        return MISSING_PACKAGES
    protocol = protocol_from_environment()
    if protocol not in PROTOCOLS:
        return f"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL {protocol!r} is not supported: give grpc or http/protobuf."
    module = "grpc" if protocol == "grpc" else "http"
    try:
        __import__(f"opentelemetry.exporter.otlp.proto.{module}.trace_exporter")
    except ImportError:
        return MISSING_PACKAGES
    return None


def combined_timings(timings: Sequence[RequestTimings | None], now: float) -> RequestTimings | None:
    """One request's timings from its engine requests' (a completions prompt list has several): the first
    arrival, scheduling and token, and the last finish (`now` for a request that ended unfinished)."""
    known = [t for t in timings if t is not None]
    if not known:
        return None

    def first(values):
        present = [v for v in values if v is not None]
        return min(present) if present else None

    finishes = [t.finished for t in known if t.finished is not None]
    return RequestTimings(
        arrival=min(t.arrival for t in known),
        first_scheduled=first(t.first_scheduled for t in known),
        first_token=first(t.first_token for t in known),
        finished=max(finishes) if len(finishes) == len(timings) else now,
    )


def span_attributes(request_id: str, generation: Generation, timings: RequestTimings) -> dict[str, Any]:
    usage = generation.usage()
    params = generation.requests[0].sampling_params
    attributes: dict[str, Any] = {
        REQUEST_ID: request_id,
        REQUEST_MODEL: generation.model_name,
        RESPONSE_MODEL: generation.model_name,
        REQUEST_MAX_TOKENS: params.max_tokens,
        REQUEST_TEMPERATURE: params.temperature,
        REQUEST_TOP_P: params.top_p,
        REQUEST_N: params.n,
        USAGE_PROMPT_TOKENS: usage.prompt_tokens,
        USAGE_COMPLETION_TOKENS: usage.completion_tokens,
        USAGE_NUM_SEQUENCES: len(generation.choices),
        RESPONSE_FINISH_REASONS: [choice.finish_reason or "unfinished" for choice in generation.choices],
    }
    assert timings.finished is not None  # combined_timings always sets it
    attributes[LATENCY_E2E] = timings.finished - timings.arrival
    if timings.first_scheduled is not None:
        attributes[LATENCY_TIME_IN_QUEUE] = timings.first_scheduled - timings.arrival
        attributes[LATENCY_INFERENCE] = timings.finished - timings.first_scheduled
    if timings.first_token is not None:
        attributes[LATENCY_TIME_TO_FIRST_TOKEN] = timings.first_token - timings.arrival
        attributes[LATENCY_DECODE] = timings.finished - timings.first_token
        if timings.first_scheduled is not None:
            attributes[LATENCY_PREFILL] = timings.first_token - timings.first_scheduled
    return attributes


class RequestTracer:
    """The tracer provider and its exporter; `record` is called on the event loop when a request ends and only
    builds a span and queues it."""

    def __init__(self, endpoint: str):
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from server.tracing_export import ReportingExporter, otlp_exporter

        resource = Resource.create()
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            # neither OTEL_SERVICE_NAME nor OTEL_RESOURCE_ATTRIBUTES named the service
            resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
        protocol = protocol_from_environment()
        self.exporter = ReportingExporter(otlp_exporter(protocol, endpoint), f"{endpoint} ({protocol})")
        # Not the global provider: the server's spans are its own, and tests start several apps in one process.
        self.provider = TracerProvider(resource=resource, shutdown_on_exit=False)  # shutdown() below, bounded
        self.provider.add_span_processor(BatchSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("kiln.server")
        self._propagator = TraceContextTextMapPropagator()
        self._kind = SpanKind.SERVER
        self._error = Status(StatusCode.ERROR, "the request ended before it finished")
        logger.info("Tracing requests to %s (%s)", endpoint, protocol)

    def record(self, request_id: str, headers: Mapping[str, str], generation: Generation) -> None:
        now = time.monotonic()
        timings = combined_timings(generation.timings, now)
        if timings is None:  # no engine output came back: nothing was timed
            return
        assert timings.finished is not None
        wall_offset_ns = time.time_ns() - int(now * 1e9)  # monotonic -> wall-clock nanoseconds
        carrier = {name: headers[name] for name in TRACE_HEADERS if name in headers}
        span = self.tracer.start_span(
            SPAN_NAME,
            context=self._propagator.extract(carrier),
            kind=self._kind,
            attributes=span_attributes(request_id, generation, timings),
            start_time=wall_offset_ns + int(timings.arrival * 1e9),
        )
        if not generation.finished:
            span.set_status(self._error)
        span.end(end_time=wall_offset_ns + int(timings.finished * 1e9))

    def shutdown(self) -> None:
        """Send what is queued, for at most SHUTDOWN_TIMEOUT_MS (in a thread: export blocks)."""
        thread = threading.Thread(target=self.provider.shutdown, name="kiln-tracing-shutdown", daemon=True)
        thread.start()
        thread.join(SHUTDOWN_TIMEOUT_MS / 1000)


def create_tracer(endpoint: str | None) -> RequestTracer | None:
    return RequestTracer(endpoint) if endpoint else None
