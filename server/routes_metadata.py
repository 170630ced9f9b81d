"""GET /v1/metadata (the engine's manifest) and GET /v1/version."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, Request

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
    extra = dict(info.extra)
    speculative = extra.pop("speculative", None)
    if speculative:
        stats = engine.stats()
        speculative = speculative | {
            "num_drafts": stats.spec_num_drafts,
            "draft_tokens": stats.spec_draft_tokens,
            "accepted_tokens": stats.spec_accepted_tokens,
            "acceptance_rate": stats.spec_acceptance_rate,
            "mean_accepted_length": stats.spec_mean_accepted_length,
            "alpha": stats.spec_alpha,
            "accepted_per_position": stats.spec_accepted_per_position,
            "checked_per_position": stats.spec_checked_per_position,
        }
    return MetadataResponse(
        model=holder.served_model_name,
        source_model=info.model_name,
        backend=info.backend,
        precision=str(extra.get("precision", info.dtype)),
        kv_cache_dtype=info.kv_cache_dtype,
        hardware=str(extra.get("hardware", info.device)),
        profile=extra.get("profile"),
        max_model_len=info.max_model_len,
        vocab_size=info.vocab_size,
        block_size=info.block_size,
        num_kv_blocks=info.num_kv_blocks,
        kv_capacity_tokens=info.kv_capacity_tokens,
        speculative=speculative,
        versions={**_versions(), **{str(k): str(v) for k, v in dict(extra.get("versions", {})).items()}},
        extra=extra,
    )


@router.get("/v1/version", response_model=VersionResponse)
async def server_version() -> VersionResponse:
    return VersionResponse(version=__version__)
