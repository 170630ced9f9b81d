"""The FastAPI app factory."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp

from engines.base import Engine
from server import (
    __version__,
    routes_chat,
    routes_completions,
    routes_health,
    routes_metadata,
    routes_models,
    routes_responses,
    routes_tokenize,
)
from server.auth import ApiKeyMiddleware
from server.body_limit import BodyLimitMiddleware
from server.disconnect import ClientDisconnected
from server.engine_state import EngineHolder
from server.errors import install_error_handlers
from server.metrics import ServerMetrics
from server.request_id import RequestIdMiddleware
from server.settings import ServerSettings
from server.shutdown import InFlight
from server.tracing import create_tracer

# Status nginx uses for "client closed request"; nobody reads it, the log does.
CLIENT_CLOSED_REQUEST = 499


class _KilnAPI(FastAPI):
    """FastAPI with the request-id and CORS middleware outermost, outside Starlette's ServerErrorMiddleware
    (add_middleware puts them inside it), so that even the 500 of an unexpected exception carries the
    request id and CORS headers. From the outside in:

    - RequestIdMiddleware: every response carries X-Request-Id, CORS preflights included, and every log
      line of the request its id.
    - CORSMiddleware (with --allowed-origins), before ApiKeyMiddleware: browsers send preflights without
      the Authorization header, so they must be answered before the key is checked, and a 401 (like every
      other error) needs Access-Control-Allow-Origin for the page to read it rather than see a network error.
    - ServerErrorMiddleware, then ApiKeyMiddleware and BodyLimitMiddleware (create_app), then the routes.
    """

    def build_middleware_stack(self) -> ASGIApp:
        app = super().build_middleware_stack()
        origins = self.state.settings.allowed_origins
        if origins:
            app = CORSMiddleware(
                app,
                allow_origins=origins,
                allow_methods=["GET", "POST"],
                # Any: the OpenAI SDKs send x-stainless-* headers that change between versions, and a header
                # missing here fails the preflight and with it every call. The origins are what is restricted.
                allow_headers=["*"],
                # What scripts may read beyond the CORS-safelisted headers; the SDKs read Retry-After on 429.
                expose_headers=["X-Request-Id", "Retry-After"],
            )
        return RequestIdMiddleware(app)


def create_app(
    settings: ServerSettings | None = None,
    engine: Engine | None = None,
    on_engine_failure: Callable[[], None] | None = None,
) -> FastAPI:
    """Build the app. Without `engine`, the app loads one from `settings` in a background thread at
    startup (so /v1/health/live answers at once) and shuts it down at exit; a given engine is the
    caller's to start and shut down. `on_engine_failure` is called if the background load fails or the
    engine dies later (the caller stops the server so that its supervisor restarts it)."""
    settings = settings or ServerSettings()
    holder = EngineHolder(settings.served_model_name, engine)
    tracer = create_tracer(settings.otlp_traces_endpoint)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine is None:
            holder.start_loading(settings.engine_config(), on_engine_failure)
        else:
            holder.watch(on_engine_failure)
        try:
            yield
        finally:
            await holder.stop_watching()
            if engine is None:
                await holder.shutdown()
            if tracer is not None:
                tracer.shutdown()

    app = _KilnAPI(title="kiln", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.engine_holder = holder
    app.state.metrics = ServerMetrics(holder)
    app.state.in_flight = InFlight()
    app.state.tracer = tracer
    install_error_handlers(app)
    # The last added runs first: the API key is checked before the body size, and both before a byte is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)

    @app.exception_handler(ClientDisconnected)
    async def _client_disconnected(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    for module in (
        routes_health,
        routes_models,
        routes_metadata,
        routes_chat,
        routes_completions,
        routes_tokenize,
        routes_responses,
    ):
        app.include_router(module.router)
    return app
