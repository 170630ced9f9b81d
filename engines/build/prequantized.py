"""`kiln build` of a pre-quantized checkpoint (config.json's quantization_config): the engine keeps the weights as
stored (engines/torch/prequantized reads them into kiln's formats; nothing is quantized again and no float copy of
the quantized projections exists), and the build adds what a float build adds around the weights: the KV cache's
scales and the evaluation.

- KV cache: `--kv-cache-dtype auto` is the checkpoint's own quantized KV dtype when it carries KV scales, else the
  machine's (as for a float model). A quantized KV cache uses the checkpoint's scales when it has them
  (prequantized/kv_scales.py), else scales calibrated here on the checkpoint's own model, as a float build does.
- Evaluation: no float original exists, so the reference is the checkpoint itself, served with its stored weights
  in float32 and a float KV cache; what the build measures is what its KV cache (and serving dtype) costs. The
  build report says so.
- Precision: the kiln scheme whose runtime format runs the stored weights (own_precision); `--precision` may
  be auto or that one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from engines import calibration
from engines.build.builder import (
    CALIB_MAX_TOKENS,
    BuildOptions,
    _auto_kv,
    _build_hash,
    _Candidate,
    _check_same_vocabulary,
    _engine_dtype,
    _kv_scales,
    _measure_speed,
    _reference_answers,
    _write_engine,
)
from engines.build.calibrate import Needs, calibrate
from engines.build.evaluate import compare
from engines.build.quantize import QuantizedModel
from engines.build.result import BuildError, BuildResult, up_to_date_engine
from engines.hardware import Hardware
from engines.torch import prequantized
from engines.torch.models.registry import architecture
from engines.torch.prequantized.kv_scales import convert_kv_scales

REFERENCE = (
    "the pre-quantized checkpoint itself, served with its stored weights in float32 and a float KV cache (it has no "
    "float original)"
)
# the kiln scheme that runs each stored format; int4 is named after the method that wrote it where the method says
INT4_SCHEME = {"gptq": "int4-gptq", "awq": "int4-awq"}


def own_precision(method: str, formats: dict[str, str]) -> str:
    """The checkpoint's own precision in kiln's scheme names, from its projections' stored formats (fp8 first: it
    sets the strictest GPU requirement; compressed-tensors' int4 is llm-compressor's GPTQ recipe by default)."""
    kinds = {fmt for kind, fmt in formats.items() if kind != "lm_head"}
    if "fp8" in kinds:
        return "fp8"
    if "int4" in kinds:
        return INT4_SCHEME.get(method, "int4-gptq")
    return "int8-wo"


def build_prequantized(
    options: BuildOptions, hardware: Hardware, folder: Path, hf_config, device: torch.device, target, started: float
) -> BuildResult:
    """builder.build for a folder whose config.json has a quantization_config (its checks on options and the output
    directory already made)."""
    from transformers import AutoTokenizer

    from engines.torch.loader import pick_dtype
    from engines.torch.sequence_runner import SequenceRunner

    arch = architecture(hf_config.model_type)
    stored = prequantized.read_prequantized(folder, hf_config, _stored_dtype(hf_config), device)
    precision = own_precision(stored.method, stored.formats)
    if options.precision not in ("auto", precision):
        raise BuildError(
            f"{folder} is already quantized ({stored.method}, stored as {precision}) and is built as stored; "
            f"--precision {options.precision} would quantize it again, so leave --precision at auto or {precision}."
        )
    kv = options.kv_cache_dtype
    if kv == "auto":
        kv = stored.kv_dtype if stored.kv_scales is not None else _auto_kv(hardware)
    cand = _Candidate(precision, kv, None, reference=REFERENCE)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if target is not None:
        _check_same_vocabulary(tokenizer, target)
    calib_requests = calibration.select_samples(
        calibration.load_chat_requests(options.calib or calibration.default_calibration_path()), options.calib_samples
    )
    eval_requests = calibration.load_chat_requests(calibration.default_eval_path())[: options.eval_samples]
    output = Path(options.output).expanduser()
    build_hash = _build_hash(options, folder, [cand], hardware, calib_requests, eval_requests)
    if (existing := up_to_date_engine(output, build_hash, options.force)) is not None:
        return BuildResult(output, True, existing)

    fp32 = torch.float32
    args = stored.args
    reference = arch.assemble(args, dict(stored.tensors), stored.formats, fp32, device)
    calib, calib_seconds = None, 0.0
    details: dict[str, object] = {"prequantized": stored.method}
    if kv in ("int8", "fp8"):
        if stored.kv_scales is not None:
            cand.kv_scales = convert_kv_scales(stored.kv_scales, stored.kv_dtype, kv)
            details["kv_scales"] = f"the checkpoint's ({stored.kv_dtype})"
        else:
            t0 = time.perf_counter()
            prompts = calibration.render_prompts(calib_requests, tokenizer, CALIB_MAX_TOKENS)
            calib = calibrate(reference, prompts, Needs(kv=True), fp32, device, progress=options.progress)
            cand.kv_scales = _kv_scales(calib, options.calibrator, kv)
            calib_seconds = time.perf_counter() - t0
            details["kv_scales"] = f"calibrated ({options.calibrator})"
    cand.quantized = QuantizedModel(stored.tensors, stored.formats, details=details)

    eval_prompts = calibration.render_prompts(eval_requests, tokenizer, CALIB_MAX_TOKENS)
    answers = _reference_answers(reference, hf_config, tokenizer, folder, device, eval_prompts, options)
    longest = max(len(p) + len(a) for p, a in zip(eval_prompts, answers))
    test_dtype = _engine_dtype(precision, pick_dtype("auto", device))
    model = arch.assemble(args, dict(stored.tensors), stored.formats, test_dtype, device)
    runner = SequenceRunner(model, test_dtype, device, longest, kv_cache_dtype=kv, kv_cache_scales=cand.kv_scales)
    cand.accuracy = compare(
        SequenceRunner(reference, fp32, device, longest),
        runner,
        eval_prompts,
        answers,
        progress=options.progress,
        desc=f"evaluate {precision} (stored)",
    )
    del runner, model, reference
    if options.max_accuracy_loss is not None and cand.accuracy.kl_mean > options.max_accuracy_loss:
        raise BuildError(
            f"the checkpoint's stored weights with a {kv} KV cache measure mean KL {cand.accuracy.kl_mean:.4f} "
            f"against their own float-KV answers, over --max-accuracy-loss {options.max_accuracy_loss}; raise the "
            "budget or pick another --kv-cache-dtype."
        )
    speeds = []
    if options.bench:
        speeds = _measure_speed(args, cand, hf_config, tokenizer, folder, device, test_dtype)
    manifest = _write_engine(
        output,
        folder,
        options,
        hardware,
        args,
        hf_config,
        cand,
        [cand],
        build_hash,
        calib,
        calib_requests,
        calib_seconds,
        speeds,
        started,
        target,
    )
    return BuildResult(output, False, manifest, json.loads((output / "build-report.json").read_text()))


def _stored_dtype(hf_config) -> torch.dtype:
    """The dtype config.json says the float tensors (embeddings, norms, an unquantized LM head) are stored in, so
    the engine keeps them as they are; float32 (exact for any float dtype) where it says none."""
    value = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32
