"""The server's hold on its engine: loaded in a background thread, ready once started, dead if its loop dies."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from engines.base import Engine
from engines.config import EngineConfig
from engines.daemon import run_in_daemon_thread
from server.errors import APIError, model_not_found, not_ready
from server.logprobs import TokenStrings

logger = logging.getLogger("kiln.server")

WATCH_SECONDS = 0.25  # how often the engine's liveness is checked


class EngineHolder:
    def __init__(self, served_model_name: str | None = None, engine: Engine | None = None):
        self._served_model_name = served_model_name
        self.engine = engine
        self.loading = False
        self.error: str | None = None
        self.created = int(time.time())
        self.token_strings = TokenStrings(engine.tokenizer) if engine is not None else None
        self._load_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        self.died = False  # the engine was serving, then its loop died

    # ---- state ----------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.is_alive

    def status(self) -> tuple[str, str]:
        """(status, message) for the health endpoints."""
        if self.ready:
            return "ready", "The model is loaded and serving requests."
        if self.engine is not None:
            return "dead", "The engine has stopped; no request can be served. Restart the server."
        if self.error is not None:
            return "failed", f"The model failed to load: {self.error}"
        return "loading", "The model is loading; retry when GET /v1/health/ready returns 200."

    def get(self) -> Engine:
        """The engine, or a 503 error while it loads or after it died."""
        if self.ready:
            assert self.engine is not None  # ready implies an engine
            return self.engine
        status, message = self.status()
        if status == "dead":
            raise APIError(503, message, "service_unavailable_error", code="engine_dead")
        raise not_ready(message)

    @property
    def served_model_name(self) -> str:
        return self._served_model_name or self.get().info.model_name

    def check_model(self, requested: str | None) -> str:
        """The served model name; 404 when the request names another model."""
        served = self.served_model_name
        if requested is not None and requested != served:
            raise model_not_found(requested)
        return served

    # ---- lifecycle ------------------------------------------------------------------------------
    def start_loading(self, config: EngineConfig, on_failure: Callable[[], None] | None = None) -> None:
        self.loading = True
        self._load_task = asyncio.get_running_loop().create_task(self._load(config, on_failure))

    async def _load(self, config: EngineConfig, on_failure: Callable[[], None] | None) -> None:
        from engines import create_engine

        started = time.monotonic()
        logger.info("Loading model %s", config.model or "(embedded default SmolLM2-135M-Instruct)")
        try:
            engine = await run_in_daemon_thread(lambda: create_engine(config), "kiln-engine-load")
            await engine.start()
        except Exception as exc:
            self.error = str(exc) or type(exc).__name__
            self.loading = False
            logger.error("The model failed to load: %s", self.error)
            if on_failure is not None:
                on_failure()
            return
        self.token_strings = TokenStrings(engine.tokenizer)
        self.engine = engine
        self.loading = False
        logger.info(
            "Model %s ready in %.1f s (%s, %s on %s)",
            engine.info.model_name,
            time.monotonic() - started,
            engine.info.backend,
            engine.info.dtype,
            engine.info.device,
        )
        self.watch(on_failure)

    def watch(self, on_death: Callable[[], None] | None) -> None:
        """Watch the serving engine; when its loop dies, mark the server dead (liveness fails) and call
        `on_death`, so the process exits and its supervisor (compose, Kubernetes) restarts it."""
        self._watch_task = asyncio.get_running_loop().create_task(self._watch(on_death))

    async def _watch(self, on_death: Callable[[], None] | None) -> None:
        while self.engine is not None and self.engine.is_alive:
            await asyncio.sleep(WATCH_SECONDS)
        if self.engine is None:
            return
        self.died = True
        logger.error("The engine died; the server stops so that it can be restarted.")
        if on_death is not None:
            on_death()

    async def stop_watching(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)

    async def shutdown(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self.engine is not None:
            await self.engine.shutdown()
