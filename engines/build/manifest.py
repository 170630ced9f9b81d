"""engine.json: what an engine directory holds and what it needs, and the checks before serving it.

The manifest names the schema version, backend, model, precision, weight format per projection
kind, KV-cache dtype, the hardware it was built for (and requires), the calibration summary, kiln's
version and a sha256 per file. `load_manifest` refuses, in one sentence each: a folder without
engine.json, unreadable JSON, a newer schema, a missing or altered file; `check_hardware`
refuses an engine the machine cannot run (FP8 on a GPU before SM 89, a GPU engine on a CPU...).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from engines import schemes
from engines.hardware import Hardware

SCHEMA_VERSION = 1
MANIFEST = "engine.json"
WEIGHTS = "weights.safetensors"


class EngineDirError(ValueError):
    """An engine directory that cannot be served here, with the one-sentence reason."""


def requirements(precision: str, device: str) -> dict:
    """What a torch engine at `precision` needs: the device, and on CUDA its scheme's minimum SM."""
    return {"device": device, "min_sm": schemes.get(precision).min_sm if device == "cuda" else None}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checksums(folder: Path, names: list[str]) -> dict[str, dict]:
    return {name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size} for name in sorted(names)}


def write_manifest(folder: Path, manifest: dict) -> None:
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def is_engine_dir(folder: str | Path) -> bool:
    return (Path(folder).expanduser() / MANIFEST).is_file()


def load_manifest(folder: str | Path, verify: bool = True) -> dict:
    """engine.json of `folder`, after checking its schema and (verify) every file's checksum."""
    folder = Path(folder).expanduser()
    path = folder / MANIFEST
    if not path.is_file():
        raise EngineDirError(f"{folder} is not a kiln engine directory (it has no {MANIFEST}); build one with "
                             f"`kiln build --model MODEL --output {folder}` or serve a model folder with --model.")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EngineDirError(f"{path} cannot be read as JSON ({exc}).") from exc
    schema = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if not isinstance(schema, int):
        raise EngineDirError(f"{path} has no schema_version; it was not written by `kiln build`.")
    if schema > SCHEMA_VERSION:
        raise EngineDirError(f"{path} uses engine schema {schema}, newer than the {SCHEMA_VERSION} this kiln "
                             "reads; upgrade kiln or rebuild the engine with this version.")
    if verify:
        verify_files(folder, manifest)
    return manifest


def verify_files(folder: Path, manifest: dict) -> None:
    """Every file of the engine directory is listed in the manifest with its sha256, and matches it: a
    manifest without checksums, or a file it does not list, would let altered weights be served."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or not all(
            isinstance(entry, dict) and isinstance(entry.get("sha256"), str) for entry in files.values()):
        raise EngineDirError(f"{folder / MANIFEST} lists no sha256 checksum for its files, so they cannot be "
                             "verified; rebuild the engine with `kiln build`.")
    unlisted = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*")
                      if path.is_file() and path.name != MANIFEST and path.relative_to(folder).as_posix() not in files)
    if unlisted:
        raise EngineDirError(f"Engine file {folder / unlisted[0]} is not listed in {MANIFEST}, so it cannot be "
                             "verified; remove it or rebuild the engine.")
    for name, entry in files.items():
        file = folder / name
        if not file.is_file():
            raise EngineDirError(f"Engine file {file} is missing; rebuild the engine.")
        if sha256_file(file) != entry["sha256"]:
            raise EngineDirError(f"Engine file {file} does not match its checksum in {MANIFEST} (altered or "
                                 "corrupt); rebuild the engine.")


def check_hardware(manifest: dict, hardware: Hardware) -> None:
    """Refuse an engine whose target this machine is not: wrong device kind or too old a GPU."""
    req = manifest.get("target", {}).get("requires", {})
    built_for = manifest.get("target", {}).get("description", "other hardware")
    device = req.get("device", "cpu")
    precision = manifest.get("precision", "?")
    if device != hardware.device:
        raise EngineDirError(f"This {precision} engine was built for {device} ({built_for}) but this machine runs on "
                             f"{hardware.device}; rebuild it here with `kiln build`.")
    min_sm = req.get("min_sm")
    if device == "cuda" and min_sm is not None and (hardware.sm or 0) < min_sm:
        raise EngineDirError(f"This {precision} engine needs a GPU with SM >= {min_sm} but {hardware.name} is "
                             f"SM {hardware.sm}; rebuild it with a precision this GPU supports (see `kiln profiles`).")
