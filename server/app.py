"""The FastAPI app factory."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI, Request, Response

from engines.base import Engine
from server import __version__, routes_chat, routes_completions, routes_health, routes_metadata, routes_models
from server.disconnect import ClientDisconnected
from server.engine_state import EngineHolder
from server.errors import install_error_handlers
from server.metrics import ServerMetrics
from server.settings import ServerSettings

# Status nginx uses for "client closed request"; nobody reads it, the log does.
CLIENT_CLOSED_REQUEST = 499


def create_app(
    settings: ServerSettings | None = None,
    engine: Engine | None = None,
    on_engine_failure: Callable[[], None] | None = None,
) -> FastAPI:
    """Build the app. Without `engine`, the app loads one from `settings` in a background thread at
    startup (so /v1/health/live answers at once) and shuts it down at exit; a given engine is the
    caller's to start and shut down. `on_engine_failure` is called if the background load fails."""
    settings = settings or ServerSettings()
    holder = EngineHolder(settings.served_model_name, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine is None:
            holder.start_loading(settings.engine_config(), on_engine_failure)
        try:
            yield
        finally:
            if engine is None:
                await holder.shutdown()

    app = FastAPI(title="kiln", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.engine_holder = holder
    app.state.metrics = ServerMetrics(holder)
    install_error_handlers(app)

    @app.exception_handler(ClientDisconnected)
    async def _client_disconnected(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    for module in (routes_health, routes_models, routes_metadata, routes_chat, routes_completions):
        app.include_router(module.router)
    return app
