"""Liveness, readiness and Prometheus metrics; open even when an API key is set."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from server.protocol import HealthResponse

router = APIRouter()

DRAINING = "The server is shutting down: requests in flight finish, new ones are not taken."


@router.get("/v1/health/live", response_model=HealthResponse)
async def live(request: Request):
    """200 as soon as the process answers HTTP, model loaded or not; 503 once the engine has died (the
    process then exits, so that its supervisor restarts it)."""
    status, message = request.app.state.engine_holder.status()
    if status == "dead":
        return JSONResponse(HealthResponse(status=status, message=message).model_dump(), status_code=503)
    return HealthResponse(status="live", message="The server is up.")


@router.get("/v1/health/ready", response_model=HealthResponse)
@router.get("/health", response_model=HealthResponse)
async def ready(request: Request):
    """200 once the engine is loaded and its step loop runs; 503 while loading, after a failed load or a crash,
    and from SIGTERM on (draining: requests in flight finish, the replica takes no new ones)."""
    status, message = request.app.state.engine_holder.status()
    if request.app.state.in_flight.draining:
        status, message = "draining", DRAINING
    body = HealthResponse(status=status, message=message)
    return JSONResponse(body.model_dump(), status_code=200 if status == "ready" else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
