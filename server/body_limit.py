"""A limit on request body size, enforced before and while the body is read.

A body announced larger than the limit (Content-Length) gets its 413 at once, unread; a chunked body is
counted as it arrives and refused the moment it passes the limit, so no request makes the server buffer
more than the limit.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError, error_response


def _too_large(limit: int) -> str:
    return (
        f"The request body is larger than this server's limit of {limit} bytes (kiln serve --max-request-body-bytes)."
    )


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            error = APIError(413, _too_large(self.max_bytes), code="request_too_large")
            await error_response(error)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI passes HTTPExceptions raised while it reads the body through to the app's
                    # handler, which answers with the 413 envelope.
                    raise HTTPException(413, _too_large(self.max_bytes))
            return message

        await self.app(scope, limited_receive, send)
