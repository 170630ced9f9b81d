"""`kiln build`: model folder -> engine directory (docs/architecture.md, "The build pipeline").

The float model is never loaded whole: its checkpoint is read one decoder layer at a time (engines/build/stream.py).
Phases, each with a progress bar: the float model's greedy answers to the held-out prompts (cached by model) and its
outputs on them; then per candidate precision one pass over the layers that calibrates (when the precision or the
KV cache needs statistics), quantizes, stores and evaluates each layer in turn (engines/build/candidate.py); the
decode speed of the chosen engine; the write. The directory is written beside the target and renamed into place at
the end, so a failed build never leaves half an engine.

Re-running with the same inputs reuses the engine: the build hash covers the model files, every
option that changes the result, the calibration data and the target hardware; when the existing
engine.json carries the same hash and its files verify, nothing is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engines import calibration, schemes
from engines.build import manifest as mf
from engines.build.candidate import HeldOut, build_candidate
from engines.build.engine_dir import (
    CALIB_MAX_TOKENS,
    Candidate,
    DraftTarget,
    auto_kv,
    check_same_vocabulary,
    compute_build_hash,
    engine_dtype,
    loaded_model,
    measure_speed,
    write_engine,
)
from engines.build.evaluate import answer_rows
from engines.build.fingerprint import model_fingerprint
from engines.build.greedy import streamed_greedy_answers
from engines.build.result import BuildError, BuildResult, up_to_date_engine
from engines.build.shards import Shards
from engines.build.stream import Checkpoint, float_outputs
from engines.hardware import Hardware, detect
from engines.model_source import cache_dir, resolve_model
from engines.parallel import TORCH_REFUSAL, GpuSplit, SplitError
from engines.profiles import DEFAULT_GROUP_SIZE, Profile, load_profiles, pick, supported_on
from engines.torch import prequantized
from engines.torch.models.registry import architecture
from engines.trtllm.build import build_trtllm

log = logging.getLogger("kiln.build")

CALIBRATORS = ("minmax", "percentile", "entropy")
KV_CHOICES = ("auto", "model", "int8", "fp8")
DRAFT_PRECISION = "int4-awq"  # what `--draft-of` builds unless --precision says otherwise


@dataclass(frozen=True)  # what --draft-of resolves comes back as a new BuildOptions (_resolve_draft_of)
class BuildOptions:
    model: str | None = None
    output: str = "engine"
    precision: str = "auto"
    kv_cache_dtype: str = "auto"
    calib: str | None = None
    calib_samples: int = calibration.DEFAULT_SAMPLES
    calibrator: str = "minmax"
    group_size: int = DEFAULT_GROUP_SIZE
    backend: str = "torch"
    max_accuracy_loss: float | None = None  # mean KL (nats) budget on the held-out set
    eval_samples: int = 128
    eval_tokens: int = 32
    bench: bool = True
    device: str = "auto"
    force: bool = False
    progress: bool = True
    draft_of: str | None = None  # build a speculative-decoding draft for this engine directory
    gather_logits: bool = False  # trtllm: BuildConfig(gather_generation_logits=True), which logprobs need
    # GPUs the model is split across (engines/parallel.py): --backend trtllm only
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    def validate(self) -> None:
        torch_precisions = schemes.torch_names()
        if self.precision != "auto" and self.precision not in schemes.names():
            raise BuildError(
                f"--precision must be auto or one of {', '.join(torch_precisions)}, got {self.precision!r}."
            )
        scheme = None if self.precision == "auto" else schemes.get(self.precision)
        if scheme is not None and not scheme.torch_build and self.backend != "trtllm":
            trtllm_sm = f" with SM >= {scheme.trtllm.min_sm}" if scheme.trtllm else ""
            raise BuildError(
                f"--precision {self.precision} needs --backend trtllm and an NVIDIA GPU{trtllm_sm}; "
                f"kiln's torch engine builds {', '.join(torch_precisions)}."
            )
        if self.kv_cache_dtype not in KV_CHOICES:
            raise BuildError(f"--kv-cache-dtype must be one of {', '.join(KV_CHOICES)}, got {self.kv_cache_dtype!r}.")
        if self.calibrator not in CALIBRATORS:
            raise BuildError(f"--calibrator must be one of {', '.join(CALIBRATORS)}, got {self.calibrator!r}.")
        if not calibration.MIN_SAMPLES <= self.calib_samples <= calibration.MAX_SAMPLES:
            raise BuildError(
                f"--calib-samples must be between {calibration.MIN_SAMPLES} and "
                f"{calibration.MAX_SAMPLES}, got {self.calib_samples}."
            )
        if self.group_size < 32 or self.group_size & (self.group_size - 1):
            raise BuildError(f"--group-size must be a power of two of at least 32, got {self.group_size}.")
        if self.backend not in ("torch", "trtllm"):
            raise BuildError(f"--backend must be torch or trtllm, got {self.backend!r}.")
        if self.max_accuracy_loss is not None and self.backend == "trtllm":
            # kiln's accuracy evaluation runs its own quantized models; a TensorRT-LLM engine is not evaluated
            raise BuildError(
                "--max-accuracy-loss picks a precision by kiln's evaluation, which does not run TensorRT-LLM "
                "engines; give --precision instead, or build with --backend torch."
            )
        if self.gather_logits and self.backend != "trtllm":
            raise BuildError("--gather-logits applies to --backend trtllm; torch engines return logprobs without it.")
        try:
            split = GpuSplit(self.tensor_parallel_size, self.pipeline_parallel_size)
        except SplitError as exc:
            raise BuildError(str(exc)) from None
        if split.is_split and self.backend != "trtllm":
            raise BuildError(TORCH_REFUSAL)
        if self.max_accuracy_loss is not None and self.max_accuracy_loss <= 0:
            raise BuildError(f"--max-accuracy-loss must be a positive KL divergence, got {self.max_accuracy_loss}.")
        if self.eval_samples < 1 or self.eval_tokens < 1:
            raise BuildError("--eval-samples and --eval-tokens must be at least 1.")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise BuildError(f"--device must be auto, cpu or cuda, got {self.device!r}.")


def build(options: BuildOptions, hardware: Hardware | None = None) -> BuildResult:
    options.validate()
    target = None
    if options.draft_of:
        options, target = _resolve_draft_of(options)
    if options.backend == "trtllm":
        return build_trtllm(options, hardware or detect())
    from transformers import AutoConfig, AutoTokenizer

    from engines.torch.loader import pick_device, pick_dtype

    started = time.perf_counter()
    hardware = hardware or detect()
    try:
        device = pick_device(options.device)
    except ValueError as exc:  # cuda asked for where torch sees none
        raise BuildError(f"--device {options.device}: {exc}") from exc
    folder = resolve_model(options.model)
    hf_config = AutoConfig.from_pretrained(folder)
    output = Path(options.output).expanduser()
    if output.exists() and not mf.is_engine_dir(output) and (not output.is_dir() or any(output.iterdir())):
        raise BuildError(f"--output {output} exists and is not a kiln engine directory; choose a new or empty folder.")
    if prequantized.quant_method(hf_config) is not None:  # kept as stored (engines/build/prequantized.py)
        from engines.build.prequantized import build_prequantized

        return build_prequantized(options, hardware, folder, hf_config, device, target, started)
    arch = architecture(hf_config.model_type)
    args = arch.args_from_config(hf_config)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if target is not None:
        check_same_vocabulary(tokenizer, target)

    candidates = _candidates(options, hardware, args, hf_config)
    calib_requests = calibration.select_samples(
        calibration.load_chat_requests(options.calib or calibration.default_calibration_path()), options.calib_samples
    )
    eval_requests = calibration.load_chat_requests(calibration.default_eval_path())[: options.eval_samples]
    build_hash = compute_build_hash(options, folder, candidates, hardware, calib_requests, eval_requests)
    if (existing := up_to_date_engine(output, build_hash, options.force)) is not None:
        return BuildResult(output, True, existing)

    runtime_dtype = pick_dtype("auto", device)
    log.info("Reading %s (float32) on %s a layer at a time", folder, device)
    checkpoint = Checkpoint(folder, arch, args, device)
    float_shell = checkpoint.shell(checkpoint.outer(), {}, torch.float32)
    calib_prompts = calibration.render_prompts(calib_requests, tokenizer, CALIB_MAX_TOKENS)
    eval_prompts = calibration.render_prompts(eval_requests, tokenizer, CALIB_MAX_TOKENS)
    answers = _reference_answers(checkpoint, float_shell, hf_config, tokenizer, folder, eval_prompts, options)
    sequences = [p + a for p, a in zip(eval_prompts, answers)]
    rows = answer_rows(eval_prompts, answers)
    reference = float_outputs(checkpoint, float_shell, sequences, rows, options.progress)
    held_out = HeldOut(sequences, rows, answers, reference)

    parts = output.with_name(output.name + f".parts{os.getpid()}")  # the candidates' shards, beside the output
    try:
        chosen = None
        for cand in candidates:
            cand.built = build_candidate(
                checkpoint,
                float_shell,
                cand.precision,
                cand.kv_cache_dtype,
                options.calibrator,
                options.group_size,
                engine_dtype(cand.precision, runtime_dtype),
                calib_prompts,
                held_out,
                Shards(parts / cand.precision),
                progress=options.progress,
            )
            accuracy = cand.built.accuracy
            log.info(
                "%s (KV %s): mean KL %.4f, top-1 %.1f%%, perplexity %.3f (reference %.3f)",
                cand.precision,
                cand.kv_cache_dtype,
                accuracy.kl_mean,
                100 * accuracy.top1_agreement,
                accuracy.perplexity,
                accuracy.reference_perplexity,
            )
            if options.max_accuracy_loss is None or accuracy.kl_mean <= options.max_accuracy_loss:
                chosen = cand
                break
            cand.built.shards.discard()  # only the chosen candidate is written
        if chosen is None:
            tried = ", ".join(f"{c.precision} {c.built.accuracy.kl_mean:.4f}" for c in candidates if c.built)
            raise BuildError(
                f"No precision stays within --max-accuracy-loss {options.max_accuracy_loss} "
                f"(mean KL measured: {tried}); raise the budget or pick a precision."
            )
        del float_shell

        speeds = []
        if options.bench:
            speeds = measure_speed(
                args, chosen, hf_config, tokenizer, folder, device, engine_dtype(chosen.precision, runtime_dtype)
            )

        manifest = write_engine(
            output,
            folder,
            options,
            hardware,
            args,
            hf_config,
            chosen,
            candidates,
            build_hash,
            calib_requests,
            sum(len(p) for p in calib_prompts),
            speeds,
            started,
            target,
        )
    finally:
        shutil.rmtree(parts, ignore_errors=True)
    return BuildResult(output, False, manifest, json.loads((output / "build-report.json").read_text()))


def _resolve_draft_of(options: BuildOptions) -> tuple[BuildOptions, DraftTarget]:
    """--draft-of ENGINE: the draft is, unless --model says otherwise, the target's own model, and unless
    --precision says otherwise its INT4 (AWQ) build: the smallest weights that still agree often. Returns
    the options with those filled in, and the target's manifest."""
    if not mf.is_engine_dir(options.draft_of):
        raise BuildError(f"--draft-of {options.draft_of} is not a kiln engine directory (it has no engine.json).")
    try:
        target = mf.load_manifest(options.draft_of, verify=False)
    except mf.EngineDirError as exc:
        raise BuildError(f"--draft-of {options.draft_of}: {exc}") from exc
    if options.model is None:
        source = target.model.source
        options = replace(options, model=None if source.startswith("embedded:") else source)
    if options.precision == "auto":
        options = replace(options, precision=DRAFT_PRECISION)
    return options, DraftTarget(str(Path(options.draft_of).expanduser().resolve()), target)


def _candidates(options: BuildOptions, hardware: Hardware, args, hf_config) -> list[Candidate]:
    """What to try, most aggressive first when --max-accuracy-loss chooses among several."""
    params = architecture(args.model_type).param_count(args)
    if options.precision != "auto":
        req = mf.requirements(options.precision, hardware.device)
        try:
            mf.check_target(options.precision, mf.Target(requires=req), hardware)
        except mf.EngineDirError as exc:
            raise BuildError(
                f"--precision {options.precision} is not supported on this machine: {_sm_reason(req, hardware)}."
            ) from exc
        kv = auto_kv(hardware) if options.kv_cache_dtype == "auto" else options.kv_cache_dtype
        return [Candidate(options.precision, kv, None)]
    profiles = [p for p in load_profiles() if supported_on(p, hardware)[0] and "torch" in p.backend]
    if not profiles:
        raise BuildError(f"No build profile supports this machine ({hardware.describe()}).")
    if options.max_accuracy_loss is None:
        # kiln's torch engine runs on one device: one GPU's memory, however many the machine has
        chosen: list[Profile] = [pick(hardware, params * 2, hardware.memory_bytes, profiles)]
    else:  # smallest weights first; among equals, the higher-priority profile
        chosen = sorted(profiles, key=lambda p: (p.weight_bytes(params * 2), -p.priority))
    return [
        Candidate(p.precision, p.kv_cache_dtype if options.kv_cache_dtype == "auto" else options.kv_cache_dtype, p.name)
        for p in chosen
    ]


def _sm_reason(req: mf.Requirements, hardware: Hardware) -> str:
    if req.device == "cuda" and req.min_sm:
        return f"it needs a GPU with SM >= {req.min_sm} and {hardware.name} is SM {hardware.sm}"
    return f"it needs {req.device}"


def _reference_answers(
    checkpoint: Checkpoint, float_shell, hf_config, tokenizer, folder: Path, prompts, options
) -> list[list[int]]:
    """The float32 model's greedy answers to the held-out prompts, cached by model and prompts."""
    from engines.torch.loader import eos_token_ids

    key = hashlib.sha256(json.dumps([model_fingerprint(folder), prompts, options.eval_tokens]).encode()).hexdigest()[
        :24
    ]
    path = cache_dir() / "eval" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    log.info(
        "Reference answers for %d held-out prompts (float32, greedy, up to %d tokens)",
        len(prompts),
        options.eval_tokens,
    )
    eos = eos_token_ids(loaded_model(float_shell, hf_config, tokenizer, folder, torch.float32, checkpoint.device))
    answers = streamed_greedy_answers(checkpoint, float_shell, prompts, options.eval_tokens, eos, options.progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(answers))
    tmp.rename(path)
    return answers
