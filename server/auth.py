"""Bearer-token authentication for the /v1 API when the server has an API key (health and metrics stay open)."""

from __future__ import annotations

import secrets

from fastapi import Request

from server.errors import APIError


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, "invalid_request_error", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: 401 unless `Authorization: Bearer <key>` matches the configured key."""
    expected = request.app.state.settings.api_key
    if not expected:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("Missing API key: send it as the header 'Authorization: Bearer <key>'.")
    if not secrets.compare_digest(token.strip().encode(), expected.encode()):
        raise _unauthorized("Incorrect API key provided.")
