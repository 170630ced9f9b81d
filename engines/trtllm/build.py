"""`kiln build --backend trtllm`: compile a Hugging Face model into a TensorRT engine with TensorRT-LLM's
LLM API and write it as a kiln engine directory:

    DIR/engine.json   kiln's manifest ("backend": "trtllm", precision, KV dtype, target GPU and what it
                      requires, the QuantConfig/BuildConfig used, sha256 of every file)
    DIR/trtllm/       what `LLM.save()` writes (the TensorRT engine and its config.json)
    DIR/ tokenizer files and chat template, read by kiln's server

Calibration (FP8, SmoothQuant, AWQ, an FP8 or INT8 KV cache) runs inside TensorRT-LLM's ModelOpt flow on kiln's
calibration set (or --calib), rendered through the model's chat template into a local dataset folder. The pairs of
precision and KV dtype TensorRT-LLM 1.0 cannot build from float weights are refused before anything loads
(engines/trtllm/flows.py); the engine's sequence limits are set and recorded as engines/trtllm/limits.py explains.
A model type TensorRT-LLM does not convert is refused first, and a pre-quantized checkpoint is passed through as
stored (NVIDIA ModelOpt exports) or refused (the formats TensorRT-LLM 1.0 cannot read): engines/trtllm/checkpoints.py.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from engines import calibration, parallel, schemes
from engines.build import manifest as mf
from engines.build.fingerprint import model_fingerprint
from engines.build.result import BuildError, BuildResult, up_to_date_engine
from engines.hardware import Hardware
from engines.model_source import resolve_model
from engines.profiles import DEFAULT_GROUP_SIZE
from engines.trtllm import api as trt
from engines.trtllm import checkpoints, configs, flows, limits
from engines.version import __version__

log = logging.getLogger("kiln.build.trtllm")

TOKENIZER_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "generation_config.json",
)
CALIB_MAX_SEQ_LEN = 512
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_NUM_TOKENS = 8192  # BuildConfig's default: the tokens of one step (a prefill chunk with chunked prefill)


# What `--precision auto` builds with TensorRT-LLM, best first, each with its scheme's KV dtype: FP8 weights and KV
# on Ada/Hopper and later, SmoothQuant INT8 with an INT8 KV cache on Ampere.
AUTO_PRECISIONS = ("fp8", "int8-sq")


def auto_precision(hardware: Hardware) -> tuple[str, str]:
    sm = hardware.sm or 0
    for name in AUTO_PRECISIONS:
        kv = schemes.get(name).default_kv
        if sm >= trt.min_sm(name, kv):
            return name, kv
    oldest = min(trt.min_sm(name, schemes.get(name).default_kv) for name in AUTO_PRECISIONS)
    raise trt.TrtllmUnsupported(
        f"TensorRT-LLM's quantized engines need a GPU with SM >= {oldest} and {hardware.name} "
        f"is SM {hardware.sm}; use --backend torch."
    )


def build_trtllm(options, hardware: Hardware) -> BuildResult:
    """options: engines.build.builder.BuildOptions (untyped here: builder.py imports this module)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        if hardware.device != "cuda":
            raise trt.TrtllmUnavailable(
                "--backend trtllm builds on an NVIDIA GPU and torch sees none; build with --backend torch here."
            )
        folder = resolve_model(options.model)
        hf_config = AutoConfig.from_pretrained(folder)
        checkpoints.check_model_type(hf_config)
        stored = checkpoints.pass_through(folder, hf_config)
        if stored is not None:
            precision, kv = _stored_precision(options, stored)
        else:
            precision, auto_kv = auto_precision(hardware) if options.precision == "auto" else (options.precision, None)
            wanted = options.kv_cache_dtype if options.kv_cache_dtype != "auto" else auto_kv
            kv = wanted or flows.default_kv(precision, hardware.sm or 0) or "model"
            if (refusal := flows.refusal(precision, kv)) is not None:
                raise trt.TrtllmUnsupported(refusal)
            _check_group_size(precision, options.group_size)
        trt.check_gpu(precision, kv, hardware.sm, hardware.name)
        api = trt.load()  # after the checks above, which hold whether or not tensorrt_llm is installed
        if stored is not None:  # the checkpoint's own algorithms, which TensorRT-LLM reads from it again
            quant = configs.stored_quant_config(api, stored.quant_algo, configs.KV_ALGO[kv])
        else:
            quant = configs.quant_config(api, precision, kv, options.group_size)
        split = parallel.GpuSplit(options.tensor_parallel_size, options.pipeline_parallel_size)
        parallel.check_gpus(split, hardware, "This build")
    except (trt.TrtllmUnavailable, trt.TrtllmUnsupported, parallel.SplitError) as exc:
        raise BuildError(str(exc)) from exc

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    output = Path(options.output).expanduser()
    if output.exists() and not mf.is_engine_dir(output) and (not output.is_dir() or any(output.iterdir())):
        raise BuildError(f"--output {output} exists and is not a kiln engine directory; choose a new or empty folder.")
    planned = limits.plan(
        int(getattr(hf_config, "max_position_embeddings", 4096)),
        DEFAULT_MAX_BATCH_SIZE,
        DEFAULT_MAX_NUM_TOKENS,
        trt.trtllm_mapping(precision).quant_algo,
        configs.KV_ALGO[kv],
    )
    build = configs.build_config(api, planned, options.gather_logits)
    calib_requests = None
    if stored is None and configs.needs_calibration(precision, kv):
        calib_requests = calibration.select_samples(
            calibration.load_chat_requests(options.calib or calibration.default_calibration_path()),
            options.calib_samples,
        )
    build_hash = _build_hash(
        folder,
        precision,
        kv,
        options.group_size,
        calib_requests,
        hardware,
        api.version,
        planned,
        options.gather_logits,
        split,
    )
    if (existing := up_to_date_engine(output, build_hash, options.force)) is not None:
        return BuildResult(output, True, existing)

    tmp = output.with_name(output.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        # the split is an LLM argument: each MPI rank builds its own engine (engines/parallel.py)
        kwargs = dict(model=str(folder), tokenizer=str(folder), quant_config=quant, build_config=build)
        kwargs.update(split.llm_kwargs())
        calib_source = None
        if calib_requests is not None:
            dataset = _write_calibration_dataset(tmp / "calibration", calib_requests, tokenizer)
            kwargs["calib_config"] = configs.calib_config(api, str(dataset), len(calib_requests), CALIB_MAX_SEQ_LEN)
            calib_source = mf.Calibration(
                source=options.calib or "kiln:build/calibration/calib.jsonl",
                samples=len(calib_requests),
                fingerprint=calibration.fingerprint(calib_requests),
            )
        log.info("Building a %s TensorRT engine (KV %s) of %s with TensorRT-LLM %s", precision, kv, folder, api.version)
        llm = api.llm_class(**kwargs)
        try:
            llm.save(str(tmp / "trtllm"))
        finally:
            llm.shutdown()
        shutil.rmtree(tmp / "calibration", ignore_errors=True)
        engine_limits = limits.compiled(json.loads((tmp / "trtllm" / "config.json").read_text()), planned)
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, tmp / name)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        manifest = _manifest(
            options,
            hardware,
            precision,
            kv,
            quant,
            build,
            api.version,
            calib_source,
            hf_config,
            engine_limits,
            options.gather_logits,
            files,
            tmp,
            time.perf_counter() - started,
            build_hash,
        )
        mf.write_manifest(tmp, manifest)
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BuildResult(output, False, manifest)


def _stored_precision(options, stored: checkpoints.PassThrough) -> tuple[str, str]:
    """A pre-quantized checkpoint builds at its own precision and KV dtype; TensorRT-LLM also takes an FP8 KV cache
    for one that has no KV algorithm (ModelLoader._update_from_hf_quant_config allows FP8 or NVFP4 there)."""
    if options.precision not in ("auto", stored.precision):
        raise trt.TrtllmUnsupported(
            f"this checkpoint is already quantized ({stored.quant_algo}, kiln's {stored.precision}) and TensorRT-LLM "
            f"builds it as stored; leave --precision at auto or {stored.precision}."
        )
    kv = stored.kv_cache_dtype if options.kv_cache_dtype == "auto" else options.kv_cache_dtype
    allowed = {stored.kv_cache_dtype} | ({"fp8"} if stored.kv_cache_quant_algo is None else set())
    if kv not in allowed:
        raise trt.TrtllmUnsupported(
            f"TensorRT-LLM builds this checkpoint with its own KV cache ({stored.kv_cache_dtype}) or, when it has "
            f"none, an FP8 one; --kv-cache-dtype {kv} would conflict with it."
        )
    return stored.precision, kv


def _check_group_size(precision: str, group_size: int) -> None:
    """A group size TensorRT-LLM would ignore is refused rather than recorded as if it applied."""
    ignored = schemes.get(precision).grouped and not trt.trtllm_mapping(precision).grouped
    if ignored and group_size != DEFAULT_GROUP_SIZE:
        raise trt.TrtllmUnsupported(
            f"--group-size does not apply to {precision} on the trtllm backend (TensorRT-LLM's W4A16 keeps one scale "
            "per output channel); drop --group-size, or build int4-awq, whose group size TensorRT-LLM uses."
        )


def _build_hash(
    folder: Path,
    precision: str,
    kv: str,
    group_size: int,
    calib_requests,
    hardware: Hardware,
    version: str,
    planned: limits.EngineLimits,
    gather_logits: bool,
    split: parallel.GpuSplit,
) -> str:
    """Same model files, settings, calibration data, GPU and TensorRT-LLM: the same engine (so a second
    `docker compose up` reuses it)."""
    key = {
        "schema": mf.SCHEMA_VERSION,
        "kiln": __version__,
        "backend": "trtllm",
        "model": model_fingerprint(folder),
        "precision": precision,
        "kv": kv,
        "group_size": group_size,
        "trtllm": version,
        "calib": calibration.fingerprint(calib_requests) if calib_requests else None,
        "gpu": [hardware.name, hardware.sm, hardware.count],
        "limits": dataclasses.asdict(planned),
        "gather_generation_logits": gather_logits,
        "split": [split.tensor, split.pipeline],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _write_calibration_dataset(folder: Path, requests, tokenizer) -> Path:
    folder.mkdir(parents=True)
    with open(folder / "train.jsonl", "w", encoding="utf-8") as f:
        for messages in requests:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            f.write(json.dumps({"text": text}) + "\n")
    return folder


def _describe(obj) -> dict:
    """The fields of a TensorRT-LLM config object for the manifest: enums by name, nested objects (a
    BuildConfig's PluginConfig) as text, so the manifest stays JSON whatever the release adds."""
    dump = getattr(obj, "model_dump", None)
    values = dump(exclude_unset=True) if dump else dict(vars(obj))
    return {k: _jsonable(v) for k, v in values.items() if not k.startswith("_")}


def _jsonable(value):
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def _manifest(
    options,
    hardware: Hardware,
    precision: str,
    kv: str,
    quant,
    build,
    version: str,
    calib_source: mf.Calibration | None,
    hf_config,
    engine_limits: limits.EngineLimits,
    gather_logits: bool,
    files: list[str],
    tmp: Path,
    seconds: float,
    build_hash: str,
) -> mf.Manifest:
    return mf.Manifest(
        schema_version=mf.SCHEMA_VERSION,
        kiln_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        backend="trtllm",
        model=mf.ModelSource(source=options.model or "embedded:SmolLM2-135M-Instruct", model_type=hf_config.model_type),
        precision=precision,
        kv_cache_dtype=kv,
        max_model_len=engine_limits.max_seq_len,
        target=mf.Target(
            device="cuda",
            description=hardware.describe(),
            sm=hardware.sm,
            requires=mf.Requirements(device="cuda", min_sm=trt.min_sm(precision, kv)),
        ),
        trtllm=mf.TrtllmBuild(
            version=version,
            engine_dir="trtllm",
            quant_config=_describe(quant),
            build_config=_describe(build),
            build_seconds=round(seconds, 1),
            max_batch_size=engine_limits.max_batch_size,
            max_input_len=engine_limits.max_input_len,
            max_seq_len=engine_limits.max_seq_len,
            max_num_tokens=engine_limits.max_num_tokens,
            chunked_prefill=engine_limits.chunked_prefill,
            gather_generation_logits=gather_logits,
            tensor_parallel_size=options.tensor_parallel_size,
            pipeline_parallel_size=options.pipeline_parallel_size,
        ),
        calibration=calib_source,
        files=mf.checksums(tmp, files),
        build_hash=build_hash,
    )
