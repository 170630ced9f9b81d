"""engine.json: what an engine directory holds and what it needs, and the checks before serving it.

The manifest (`Manifest`, a pydantic model of engine.json) names the schema version, backend, model,
precision, weight format per projection kind, KV-cache dtype, the hardware it was built for (and requires),
the calibration summary, kiln's version and a sha256 per file. `load_manifest` refuses, in one sentence
each: a folder without engine.json, unreadable JSON, a newer schema, a manifest that does not fit the schema,
a missing or altered file; `check_hardware` refuses an engine the machine cannot run (FP8 on a GPU before
SM 89, a GPU engine on a CPU...).

Schema versions: a kiln reads every schema up to its own SCHEMA_VERSION and refuses a newer one. Adding an
optional field keeps the version; a change an older kiln would misread bumps it, and this module then keeps
reading the old layout (so engines in users' caches keep loading).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from engines import schemes
from engines.hardware import Hardware

SCHEMA_VERSION = 1
MANIFEST = "engine.json"
WEIGHTS = "weights.safetensors"


class EngineDirError(ValueError):
    """An engine directory that cannot be served here, with the one-sentence reason."""


class _Part(BaseModel):
    # Keys a later kiln of the same schema adds are ignored, not refused. Serialisation writes only the keys
    # the builder set (exclude_unset), so each backend's engine.json keeps exactly the keys it always had.
    model_config = ConfigDict(extra="ignore", frozen=True)


class ModelSource(_Part):
    source: str = ""  # a folder, a Hub id, or "embedded:NAME" for the default model
    architecture: str | None = None  # torch builds
    model_type: str | None = None
    fingerprint: str | None = None  # torch builds: engines.build.fingerprint.model_fingerprint


class Requirements(_Part):
    device: str = "cpu"
    min_sm: int | None = None  # CUDA engines: the oldest GPU generation that runs the precision


class Target(_Part):
    """The machine the engine was built on, and what a machine needs to run it."""

    device: str = "cpu"
    description: str | None = None
    sm: int | None = None
    cpu_flags: list[str] | None = None  # torch builds
    requires: Requirements = Requirements()


class Calibration(_Part):
    source: str
    samples: int
    tokens: int | None = None  # torch builds
    calibrator: str | None = None  # torch builds
    fingerprint: str


class FileEntry(_Part):
    sha256: str | None = None  # None only in a hand-edited manifest, which verify_files refuses
    bytes: int | None = None


class TrtllmBuild(_Part):
    """What `kiln build --backend trtllm` asked TensorRT-LLM for (its configs as JSON, see trtllm/build.py)."""

    version: str
    engine_dir: str = "trtllm"
    quant_config: dict[str, Any] = {}
    build_config: dict[str, Any] = {}
    build_seconds: float | None = None
    # The limits the engine was compiled with, which serving must honour (BuildConfig in tensorrt_llm/builder.py):
    # None in engines built before kiln recorded them.
    max_batch_size: int | None = None
    max_input_len: int | None = None
    max_seq_len: int | None = None
    max_num_tokens: int | None = None
    # Chunked context (prefill) was compiled in, so the LLM may run with enable_chunked_prefill.
    chunked_prefill: bool = False
    # Built with gather_generation_logits, which TensorRT-LLM's LLM API needs to return logprobs.
    gather_generation_logits: bool = False
    # How the model is split across GPUs (tensor_parallel_size x pipeline_parallel_size ranks, one engine each).
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1


class DraftOf(_Part):
    """A speculative-decoding draft: the target engine it was built for."""

    engine: str
    build_hash: str | None = None
    model: str | None = None


class Manifest(_Part):
    """engine.json. Fields a backend does not write stay None (torch: profile, weight formats, dtype; TensorRT-LLM:
    max_model_len, trtllm)."""

    schema_version: int
    kiln_version: str | None = None
    build_hash: str | None = None
    created: str | None = None
    backend: Literal["torch", "trtllm"] = "torch"
    model: ModelSource = ModelSource()
    precision: str
    profile: str | None = None
    weight_formats: dict[str, str] = {}  # torch: projection kind (and "lm_head") -> stored format
    group_sizes: dict[str, int] = {}  # torch int4: projection kind -> group size
    kv_cache_dtype: str = "model"
    dtype: str | None = None  # torch: "float32" for an fp32 engine, "auto" otherwise
    max_model_len: int | None = None  # TensorRT-LLM: the engine's compiled sequence length
    served_model_name: str | None = None  # never written by the build; a hand-edited name to serve under
    target: Target = Target()
    trtllm: TrtllmBuild | None = None
    calibration: Calibration | None = None
    files: dict[str, FileEntry] = {}
    draft_of: DraftOf | None = None

    def to_json(self) -> dict[str, Any]:
        """engine.json's content: the keys this manifest was built (or read) with."""
        return self.model_dump(mode="json", exclude_unset=True)


def requirements(precision: str, device: str) -> Requirements:
    """What a torch engine at `precision` needs: the device, and on CUDA its scheme's minimum SM."""
    return Requirements(device=device, min_sm=schemes.get(precision).min_sm if device == "cuda" else None)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checksums(folder: Path, names: list[str]) -> dict[str, FileEntry]:
    return {
        name: FileEntry(sha256=sha256_file(folder / name), bytes=(folder / name).stat().st_size)
        for name in sorted(names)
    }


def write_manifest(folder: Path, manifest: Manifest) -> None:
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=False) + "\n")


def is_engine_dir(folder: str | Path) -> bool:
    return (Path(folder).expanduser() / MANIFEST).is_file()


def load_manifest(folder: str | Path, verify: bool = True) -> Manifest:
    """engine.json of `folder`, after checking its schema and (verify) every file's checksum."""
    folder = Path(folder).expanduser()
    path = folder / MANIFEST
    if not path.is_file():
        raise EngineDirError(
            f"{folder} is not a kiln engine directory (it has no {MANIFEST}); build one with "
            f"`kiln build --model MODEL --output {folder}` or serve a model folder with --model."
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EngineDirError(f"{path} cannot be read as JSON ({exc}).") from exc
    schema = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if not isinstance(schema, int):
        raise EngineDirError(f"{path} has no schema_version; it was not written by `kiln build`.")
    if schema > SCHEMA_VERSION:
        raise EngineDirError(
            f"{path} uses engine schema {schema}, newer than the {SCHEMA_VERSION} this kiln "
            "reads; upgrade kiln or rebuild the engine with this version."
        )
    try:
        parsed = Manifest.model_validate(manifest)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "the top level"
        raise EngineDirError(
            f"{path} is not a valid kiln engine manifest ({where}: {error['msg']}); rebuild the "
            "engine with `kiln build`."
        ) from None
    if verify:
        verify_files(folder, parsed)
    return parsed


def verify_files(folder: Path, manifest: Manifest) -> None:
    """Every file of the engine directory is listed in the manifest with its sha256, and matches it: a
    manifest without checksums, or a file it does not list, would let altered weights be served."""
    files = manifest.files
    if not files or not all(entry.sha256 for entry in files.values()):
        raise EngineDirError(
            f"{folder / MANIFEST} lists no sha256 checksum for its files, so they cannot be "
            "verified; rebuild the engine with `kiln build`."
        )
    unlisted = sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and path.name != MANIFEST and path.relative_to(folder).as_posix() not in files
    )
    if unlisted:
        raise EngineDirError(
            f"Engine file {folder / unlisted[0]} is not listed in {MANIFEST}, so it cannot be "
            "verified; remove it or rebuild the engine."
        )
    for name, entry in files.items():
        file = folder / name
        if not file.is_file():
            raise EngineDirError(f"Engine file {file} is missing; rebuild the engine.")
        if sha256_file(file) != entry.sha256:
            raise EngineDirError(
                f"Engine file {file} does not match its checksum in {MANIFEST} (altered or "
                "corrupt); rebuild the engine."
            )


def check_hardware(manifest: Manifest, hardware: Hardware) -> None:
    """Refuse an engine whose target this machine is not: wrong device kind or too old a GPU."""
    check_target(manifest.precision, manifest.target, hardware)


def check_target(precision: str, target: Target, hardware: Hardware) -> None:
    """Refuse `precision` built for `target` on `hardware`, in one sentence (see check_hardware)."""
    built_for = target.description or "other hardware"
    device = target.requires.device
    if device != hardware.device:
        raise EngineDirError(
            f"This {precision} engine was built for {device} ({built_for}) but this machine runs on "
            f"{hardware.device}; rebuild it here with `kiln build`."
        )
    min_sm = target.requires.min_sm
    if device == "cuda" and min_sm is not None and (hardware.sm or 0) < min_sm:
        raise EngineDirError(
            f"This {precision} engine needs a GPU with SM >= {min_sm} but {hardware.name} is "
            f"SM {hardware.sm}; rebuild it with a precision this GPU supports (see `kiln profiles`)."
        )
