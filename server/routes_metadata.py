"""GET /v1/metadata (the engine's manifest) and GET /v1/version."""

from __future__ import annotations

import platform
from dataclasses import asdict, fields
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import APIRouter, Request

from engines.base import BuiltEngine, EngineDetails, EngineStats, SpeculationInfo
from server import __version__
from server.protocol import MetadataResponse, VersionResponse

router = APIRouter()

_PACKAGES = ("torch", "transformers", "fastapi", "uvicorn")


def _versions() -> dict[str, str]:
    versions = {"kiln": __version__, "python": platform.python_version()}
    for package in _PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return versions


@router.get("/v1/metadata", response_model=MetadataResponse)
async def metadata(request: Request) -> MetadataResponse:
    holder = request.app.state.engine_holder
    engine = holder.get()
    info = engine.info
    details = info.details
    return MetadataResponse(
        model=holder.served_model_name,
        source_model=info.model_name,
        backend=info.backend,
        precision=details.precision or info.dtype,
        kv_cache_dtype=info.kv_cache_dtype,
        hardware=details.hardware or info.device,
        profile=details.profile,
        max_model_len=info.max_model_len,
        vocab_size=info.vocab_size,
        block_size=info.block_size,
        num_kv_blocks=info.num_kv_blocks,
        kv_capacity_tokens=info.kv_capacity_tokens,
        speculative=_speculative(details.speculative, engine.stats()) if details.speculative else None,
        versions={**_versions(), **details.versions},
        extra=_extra(details),
    )


def _speculative(speculation: SpeculationInfo, stats: EngineStats) -> dict[str, Any]:
    """The configuration and the counters so far."""
    return {
        "method": speculation.method,
        **speculation.proposer,
        "num_speculative_tokens": speculation.num_speculative_tokens,
        "num_drafts": stats.spec_num_drafts,
        "draft_tokens": stats.spec_draft_tokens,
        "accepted_tokens": stats.spec_accepted_tokens,
        "acceptance_rate": stats.spec_acceptance_rate,
        "mean_accepted_length": stats.spec_mean_accepted_length,
        "alpha": stats.spec_alpha,
        "accepted_per_position": stats.spec_accepted_per_position,
        "checked_per_position": stats.spec_checked_per_position,
    }


def _extra(details: EngineDetails) -> dict[str, Any]:
    """Everything else the engine reports, each field it knows (not None), the built engine as an object."""
    extra: dict[str, Any] = {}
    for item in fields(details):
        value = getattr(details, item.name)
        if item.name in ("speculative", "versions") or value is None:
            continue
        if isinstance(value, BuiltEngine):
            value = {key: part for key, part in asdict(value).items() if part is not None}
        extra[item.name] = value
    return extra


@router.get("/v1/version", response_model=VersionResponse)
async def server_version() -> VersionResponse:
    return VersionResponse(version=__version__)
