"""Every error leaves the server in OpenAI's envelope: {"error": {"message", "type", "param", "code"}}.

Bad input is always a 400 (never FastAPI's 422, never a 500): the engine's `RequestError`s carry their OpenAI
`param` and `code`, and a ValueError of no such type is a 400 without them. The engine's own errors map by type
to 429 (queue full), 500 (it failed this one request) and 503 (not loaded, or its step loop died).
"""

from __future__ import annotations

import logging
from collections.abc import Container

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from engines.base import EngineDeadError, EngineOverloadedError, RequestError, RequestFailedError

logger = logging.getLogger("kiln.server")


class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", "invalid_request_error", "model", "model_not_found")


def from_request_error(exc: RequestError, fields: Container[str] | None = None) -> APIError:
    """The 400 for an engine's RequestError. With the request body's `fields`, its param is kept only when the
    body has such a field (SamplingParams names top_logprobs, which a completions body calls logprobs)."""
    param = exc.param if fields is None or exc.param in fields else None
    return bad_request(exc.message, param, exc.code)


def not_ready(message: str) -> APIError:
    return APIError(503, message, "service_unavailable_error", None, "engine_not_ready")


def from_exception(exc: BaseException) -> APIError:
    """The APIError an exception raised while serving a request stands for."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineOverloadedError):
        return APIError(
            429,
            str(exc) or "The server is overloaded; retry later.",
            "rate_limit_error",
            code="engine_overloaded",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, EngineDeadError):
        return APIError(
            503,
            str(exc) or "The engine has stopped; no request can be served.",
            "service_unavailable_error",
            code="engine_dead",
        )
    if isinstance(exc, RequestFailedError):
        logger.error("The engine failed a request: %s", exc)
        return APIError(500, str(exc), "server_error", code="request_failed")
    if isinstance(exc, RequestError):
        return from_request_error(exc)
    if isinstance(exc, ValueError) and not isinstance(exc, ValidationError):  # a bad response is our bug
        return bad_request(str(exc))
    logger.error("Unexpected error while serving a request", exc_info=exc)
    return APIError(500, "The server had an internal error while processing the request.", "server_error")


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable sentence (and the offending field) from FastAPI's list of pydantic errors."""
    first = exc.errors()[0]
    kind = first.get("type", "")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"The request body is not valid JSON{': ' + detail if detail else ''}.", None
    if not loc and kind in ("missing", "model_attributes_type", "dict_type", "model_type"):
        if isinstance(first.get("input"), (bytes, str)):
            return "The request body must be JSON, sent with 'Content-Type: application/json'.", None
        return "The request body must be a JSON object.", None
    msg = first.get("msg", "Invalid value")
    msg = msg.removeprefix("Value error, ")
    param = ".".join(loc) if loc else None
    if param:
        return f"Invalid value for '{param}': {msg}", param
    return msg, None


_HTTP_CODES = {413: "request_too_large"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(bad_request(message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        error = APIError(
            exc.status_code,
            str(exc.detail),
            kind,
            code=_HTTP_CODES.get(exc.status_code),
            headers=getattr(exc, "headers", None),
        )
        if exc.status_code == 404:
            error.message = f"Unknown endpoint {request.method} {request.url.path}."
        return error_response(error)

    @app.exception_handler(EngineOverloadedError)
    @app.exception_handler(EngineDeadError)
    @app.exception_handler(ValueError)
    @app.exception_handler(Exception)
    async def _engine_error(request: Request, exc: Exception):
        return error_response(from_exception(exc))
