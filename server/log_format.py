"""`kiln serve`'s logging: one handler on the root logger that every logger's records reach (kiln's, uvicorn's
error and access logs, libraries', Python warnings), in one of two formats (--log-format):

- text: `<time> <LEVEL> <logger>: <message> request_id=<id>` (request_id.LOG_FORMAT)
- json: one JSON object per line with timestamp (UTC, ISO 8601), level, logger, message, request_id while a
  request is served, the exception's traceback when there is one, and for uvicorn's access log the client,
  method, path and status as fields of their own. Log collectors (Loki, Cloud Logging, Elasticsearch) read
  the fields without parsing the message.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

from server.request_id import LOG_FORMAT, RequestIdLogFilter

ACCESS_LOGGER = "uvicorn.access"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "timestamp": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id_value", None)
        if request_id:
            entry["request_id"] = request_id
        if record.name == ACCESS_LOGGER and isinstance(record.args, tuple) and len(record.args) == 5:
            # uvicorn's access-log arguments: client address, method, path with query, HTTP version, status
            client, method, path, http_version, status = record.args
            entry.update(client=client, method=method, path=path, http_version=http_version, status=status)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: a library may log an argument JSON cannot encode; the line must still be one object
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: str) -> None:
    """Replace the root logger's handlers with one on stderr in `log_format`, which gives every record its
    request id (RequestIdLogFilter sits on the handler: a logger's own filters would see only its own
    records)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(LOG_FORMAT))
    handler.addFilter(RequestIdLogFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # warnings.warn() goes to stderr as two unformatted lines by default; through logging it gets the format
    logging.captureWarnings(True)
