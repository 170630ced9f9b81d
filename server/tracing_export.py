"""The OTLP span exporter, wrapped so that a collector that is down is one log line, not one per batch.

The SDK's exporters log every failed batch (and every retry) themselves. While the wrapper exports, what the
OpenTelemetry loggers say is held back; a first failure is logged once, with what the exporter said as its
reason, and nothing more until an export succeeds again (which is logged too). Imported only when
tracing is on (it needs the OpenTelemetry SDK)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

logger = logging.getLogger("kiln.tracing")
OTEL_LOGGER = "opentelemetry"


def otlp_exporter(protocol: str, endpoint: str) -> SpanExporter:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(endpoint=endpoint)


class _HoldExportRecords(logging.Filter):
    """On the `opentelemetry` logger's handler: records logged by the exporting thread during an export are
    kept (they are the reason of a failure) instead of going out; any other record passes to kiln's log."""

    def __init__(self):
        super().__init__()
        self.exporting_thread: int | None = None
        self.held: list[str] = []

    def reason(self) -> str:
        """The first thing the exporter said (the cause, e.g. a refused connection) and the last (its verdict)."""
        if not self.held:
            return "no reason given"
        first, last = self.held[0], self.held[-1]
        return first if first == last else f"{first} ... {last}"

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread == self.exporting_thread:
            self.held.append(record.getMessage())
            return False
        return True


class _ToKilnLog(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        logger.handle(record)


class ReportingExporter(SpanExporter):
    def __init__(self, exporter: SpanExporter, destination: str):
        self.exporter = exporter
        self.destination = destination
        self.failing = False
        self._held = _HoldExportRecords()
        handler = _ToKilnLog()
        handler.addFilter(self._held)
        otel_logger = logging.getLogger(OTEL_LOGGER)
        # Its records go through the filter above to kiln's logger (and so to kiln's handlers and format),
        # not straight to the root logger's handlers.
        otel_logger.addHandler(handler)
        otel_logger.propagate = False
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            self._held.exporting_thread = threading.get_ident()
            self._held.held = []
            try:
                result = self.exporter.export(spans)
            except Exception as exc:  # noqa: BLE001 - an exporter bug must not kill the processor's thread
                self._held.held.append(f"{type(exc).__name__}: {exc}")
                result = SpanExportResult.FAILURE
            finally:
                self._held.exporting_thread = None
            if result is SpanExportResult.SUCCESS and self.failing:
                self.failing = False
                logger.info("Exporting spans to %s works again", self.destination)
            elif result is not SpanExportResult.SUCCESS and not self.failing:
                self.failing = True
                logger.warning(
                    "Could not export %d span(s) to %s (%s); spans are dropped, and not logged again, until an "
                    "export succeeds",
                    len(spans),
                    self.destination,
                    self._held.reason(),
                )
            return result

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)
