"""What every torch build shares with the others (a float model's and a pre-quantized checkpoint's,
engines/build/builder.py and prequantized.py): the candidate it builds, the build hash, the decode-speed
measurement and the engine directory it writes (weights, report, manifest)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engines import calibration, schemes
from engines.build import manifest as mf
from engines.build.candidate import BuiltCandidate
from engines.build.fingerprint import model_fingerprint
from engines.build.quantize import needs_for
from engines.build.report import write_report
from engines.build.result import BuildError
from engines.build.speed import decode_speed
from engines.hardware import Hardware
from engines.model_source import model_display_name
from engines.torch.models.registry import architecture
from engines.version import __version__

if TYPE_CHECKING:
    from engines.build.builder import BuildOptions

log = logging.getLogger("kiln.build")
CALIB_MAX_TOKENS = 512  # calibration prompts are cut here: statistics, not long-context behaviour

FLOAT_REFERENCE = "the unquantized float32 model"
KV_REPORT_POOL = 1 << 30  # the report states KV capacity for the CPU default pool of 1 GiB
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


@dataclass
class Candidate:
    precision: str
    kv_cache_dtype: str
    profile: str | None
    built: BuiltCandidate | None = None
    reference: str = FLOAT_REFERENCE  # what the accuracy is measured against (build-report's "reference")
    calibrated: bool | None = None  # whether calibration ran; None: whenever the precision or the KV cache needs it


@dataclass
class DraftTarget:
    """The engine a `--draft-of` build drafts for."""

    path: str  # resolved
    manifest: mf.Manifest


def check_same_vocabulary(tokenizer, target: DraftTarget) -> None:
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(target.path)
    if tokenizer.get_vocab() != theirs.get_vocab():
        raise BuildError(
            f"the draft model does not share the tokenizer of the engine in {target.path}; a draft "
            "must use the target's vocabulary."
        )


def auto_kv(hardware: Hardware) -> str:
    if hardware.device == "cuda":
        return "fp8" if (hardware.sm or 0) >= 89 else "int8" if (hardware.sm or 0) >= 80 else "model"
    return "int8"


def engine_dtype(precision: str, auto: torch.dtype) -> torch.dtype:
    """The dtype an engine of `precision` runs in: its scheme's (fp32: float32), else the device's `auto`."""
    runtime = schemes.get(precision).runtime_dtype
    return auto if runtime == "auto" else getattr(torch, runtime)


def compute_build_hash(
    options: BuildOptions, folder: Path, candidates: list[Candidate], hardware: Hardware, calib_requests, eval_requests
) -> str:
    key = {
        "schema": mf.SCHEMA_VERSION,
        "kiln": __version__,
        "model": model_fingerprint(folder),
        "candidates": [(c.precision, c.kv_cache_dtype, c.profile) for c in candidates],
        "group_size": options.group_size,
        "calibrator": options.calibrator,
        "backend": options.backend,
        "max_accuracy_loss": options.max_accuracy_loss,
        "eval": [options.eval_samples, options.eval_tokens],
        "bench": options.bench,
        "calib": calibration.fingerprint(calib_requests),
        "eval_set": calibration.fingerprint(eval_requests),
        "target": [hardware.device, hardware.sm, sorted(hardware.cpu_flags)],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def loaded_model(model, hf_config, tokenizer, folder: Path, dtype, device):
    from engines.torch.loader import LoadedModel

    return LoadedModel(model, hf_config, tokenizer, model_display_name(str(folder)), folder, dtype, device)


def measure_speed(args, cand: Candidate, hf_config, tokenizer, folder, device, dtype) -> list[dict]:
    """Decode speed of the chosen engine, the whole quantized model loaded (it is the engine that will be served)."""
    from engines.config import EngineConfig
    from engines.torch.loader import build_core

    arch = architecture(args.model_type)
    tensors = cand.built.shards.load_all(device)
    tensors.pop("kv_cache.scales", None)
    model = arch.assemble(args, tensors, cand.built.formats, dtype, device)
    results = []
    for concurrency in (1, 32):
        config = EngineConfig(
            max_num_seqs=64,
            enable_prefix_caching=False,
            kv_cache_dtype=cand.kv_cache_dtype,
            kv_cache_scales=cand.built.kv_scales,
        )
        core = build_core(config, loaded_model(model, hf_config, tokenizer, folder, dtype, device))
        decode_speed(core, 1, args.vocab_size, new_tokens=8)  # warm-up: kernels, allocator
        results.append(decode_speed(core, concurrency, args.vocab_size))
        log.info("decode at concurrency %d: %s tok/s", concurrency, results[-1]["decode_tok_s"])
    return results


def write_engine(
    output: Path,
    folder: Path,
    options: BuildOptions,
    hardware: Hardware,
    args,
    hf_config,
    chosen: Candidate,
    candidates: list[Candidate],
    build_hash: str,
    calib_requests,
    calib_tokens: int,
    speeds: list[dict],
    started: float,
    target: DraftTarget | None,
) -> mf.Manifest:
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    built = chosen.built
    built.shards.join(tmp / mf.WEIGHTS, metadata={"format": "pt", "producer": f"kiln {__version__}"})
    copied = ["config.json"] + [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    for name in copied:
        shutil.copy2(folder / name, tmp / name)

    weight_bytes = (tmp / mf.WEIGHTS).stat().st_size
    scheme = schemes.get(chosen.precision)
    bf16_bytes = architecture(args.model_type).param_count(args) * 2
    kv_elem = {"model": scheme.store_dtype().itemsize, "int8": 1, "fp8": 1}[chosen.kv_cache_dtype]
    kv_per_token = 2 * args.num_layers * args.num_kv_heads * args.head_dim * kv_elem
    report = {
        "model": model_display_name(options.model) if options.model else "SmolLM2-135M-Instruct",
        "precision": chosen.precision,
        "kv_cache_dtype": chosen.kv_cache_dtype,
        "profile": chosen.profile,
        "weight_bytes": weight_bytes,
        "weight_ratio_to_bf16": round(weight_bytes / bf16_bytes, 3),
        "kv_bytes_per_token": kv_per_token,
        "kv_tokens_per_gib": KV_REPORT_POOL // kv_per_token,
        "build_seconds": round(time.perf_counter() - started, 1),
        "calibration_seconds": round(built.calibration_seconds, 1),
        "quantize_seconds": round(built.quantize_seconds, 1),
        "accuracy": built.accuracy.to_dict(),
        "reference": chosen.reference,
        "speed": speeds,
        "candidates": [
            {
                "precision": c.precision,
                "kv_cache_dtype": c.kv_cache_dtype,
                "profile": c.profile,
                "kl_mean": c.built.accuracy.kl_mean if c.built else None,
            }
            for c in candidates
        ],
        "hardware": hardware.describe(),
        "details": built.details,
    }
    (tmp / "build-report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_report(tmp / "build-report.md", report, options.max_accuracy_loss)
    files = [mf.WEIGHTS, "build-report.json", "build-report.md"] + copied
    manifest = mf.Manifest(
        schema_version=mf.SCHEMA_VERSION,
        kiln_version=__version__,
        build_hash=build_hash,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        backend="torch",
        model=mf.ModelSource(
            source=options.model or "embedded:SmolLM2-135M-Instruct",
            architecture=hf_config.architectures[0] if getattr(hf_config, "architectures", None) else None,
            model_type=hf_config.model_type,
            fingerprint=model_fingerprint(folder),
        ),
        precision=chosen.precision,
        profile=chosen.profile,
        weight_formats=built.formats,
        group_sizes=built.group_sizes,
        kv_cache_dtype=chosen.kv_cache_dtype,
        dtype=scheme.runtime_dtype,
        target=mf.Target(
            device=hardware.device,
            description=hardware.describe(),
            sm=hardware.sm,
            cpu_flags=sorted(hardware.cpu_flags),
            requires=mf.requirements(chosen.precision, hardware.device),
        ),
        calibration=None
        if not (
            chosen.calibrated
            if chosen.calibrated is not None
            else needs_for(chosen.precision, chosen.kv_cache_dtype).anything
        )
        else mf.Calibration(
            source=options.calib or "kiln:build/calibration/calib.jsonl",
            samples=len(calib_requests),
            tokens=calib_tokens,
            calibrator=options.calibrator,
            fingerprint=calibration.fingerprint(calib_requests),
        ),
        files=mf.checksums(tmp, files),
        **(
            {}
            if target is None
            else {
                "draft_of": mf.DraftOf(
                    engine=target.path, build_hash=target.manifest.build_hash, model=target.manifest.model.source
                )
            }
        ),
    )
    mf.write_manifest(tmp, manifest)
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)
    return manifest
