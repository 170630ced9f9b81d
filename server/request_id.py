"""Request ids: every request gets one, the client's `X-Request-Id` when it sends a usable one, else a
fresh uuid4 hex. It goes back as `X-Request-Id` on every response, prefixes the request's engine request
ids and ends every log line written while the request is served (` request_id=<id>`), the access log's
included, so that a client's report, the engine and the logs point at the same request.

A pure ASGI middleware, not BaseHTTPMiddleware: it only adds a header to `http.response.start`, so streams
pass through untouched, and the request runs in the middleware's own context, where the id is set.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from contextvars import ContextVar

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
MAX_LENGTH = 128
# The log format of `kiln serve`; %(request_id)s is RequestIdLogFilter's.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(request_id)s"

_current: ContextVar[str | None] = ContextVar("kiln_request_id", default=None)
# Clients may send the same X-Request-Id twice at once, and the engine keys its requests by id.
_engine_sequence = itertools.count()


def usable(value: str) -> bool:
    """1 to MAX_LENGTH visible ASCII characters: no spaces or control characters, which would let a client
    forge or break log lines."""
    return 0 < len(value) <= MAX_LENGTH and all("!" <= char <= "~" for char in value)


def _request_id(scope: Scope) -> str:
    """The client's id if usable; otherwise a new one (a bad id never fails the request)."""
    for name, value in scope["headers"]:
        if name == HEADER:
            sent = value.decode("latin-1")
            return sent if usable(sent) else uuid.uuid4().hex
    return uuid.uuid4().hex


def engine_request_id(request: Request) -> str:
    """The prefix of one API request's engine request ids: its request id and a number unique in this
    process."""
    return f"{request.state.request_id}-{next(_engine_sequence)}"


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        header = (HEADER, request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        token = _current.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _current.reset(token)


class RequestIdLogFilter(logging.Filter):
    """Gives every record `request_id`, the text format's suffix: ` request_id=<id>` while a request is served,
    else empty (startup, the engine's own thread); and `request_id_value`, the id or None, for the JSON format."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = _current.get()
        record.request_id = f" request_id={request_id}" if request_id else ""
        record.request_id_value = request_id
        return True
