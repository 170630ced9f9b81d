"""Bearer-token authentication for everything but health and metrics when the server has an API key.

An ASGI middleware rather than a route dependency: FastAPI reads and parses the body before it runs a
route's dependencies, so a client without the key could still make the server read a large body. Here
the 401 goes out before a byte of it is read. The API docs (/docs, /redoc, /openapi.json) are behind
the key too.
"""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import APIError, error_response

# Probes and scrapers carry no key.
OPEN_PATHS = frozenset({"/v1/health/live", "/v1/health/ready", "/health", "/metrics"})


def _unauthorized(message: str) -> APIError:
    return APIError(
        401, message, "invalid_request_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
    )


def check_api_key(authorization: str, expected: str) -> APIError | None:
    """The 401 for an `Authorization` header that does not carry `Bearer <expected>`, else None."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return _unauthorized("Missing API key: send it as the header 'Authorization: Bearer <key>'.")
    if not secrets.compare_digest(token.strip().encode(), expected.encode()):
        return _unauthorized("Incorrect API key provided.")
    return None


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            headers = dict(scope["headers"])
            error = check_api_key(headers.get(b"authorization", b"").decode("latin-1"), self.api_key)
            if error is not None:
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)
