"""What a build returns (or why it cannot go ahead), and the reuse of an engine already built from the same
inputs: shared by the torch builder (builder.py) and the TensorRT-LLM one (trtllm/build.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.build import manifest as mf

log = logging.getLogger("kiln.build")


class BuildError(ValueError):
    """A build that cannot go ahead, with the one-sentence reason."""


@dataclass
class BuildResult:
    output: Path
    reused: bool
    manifest: mf.Manifest
    report: dict[str, Any] = field(default_factory=dict)  # build-report.json (torch builds)


def up_to_date_engine(output: Path, build_hash: str, force: bool) -> mf.Manifest | None:
    """The manifest of the engine already in `output` when it was built from the same inputs (and verifies)."""
    if force or not mf.is_engine_dir(output):
        return None
    try:
        existing = mf.load_manifest(output)
    except mf.EngineDirError:
        return None
    if existing.build_hash != build_hash:
        return None
    log.info("Engine in %s is up to date (built %s); reusing it.", output, existing.created)
    return existing
