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
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engines import calibration
from engines.build.calibrate import Needs, calibrate_layer
from engines.build.candidate import KV_CODE_MAX, BuiltCandidate
from engines.build.engine_dir import (
    CALIB_MAX_TOKENS,
    Candidate,
    auto_kv,
    check_same_vocabulary,
    compute_build_hash,
    engine_dtype,
    loaded_model,
    measure_speed,
    write_engine,
)
from engines.build.evaluate import Accuracy, answer_rows, compare
from engines.build.greedy import greedy_answers
from engines.build.result import BuildError, BuildResult, up_to_date_engine
from engines.build.shards import Shards
from engines.build.stream import FP32, LayerRunner, embed
from engines.hardware import Hardware
from engines.torch import prequantized
from engines.torch.models.protocol import CausalLM
from engines.torch.models.registry import architecture
from engines.torch.prequantized.kv_scales import convert_kv_scales

if TYPE_CHECKING:
    from engines.build.builder import BuildOptions

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
    directory already made). The stored weights are compact already, so the model is held whole; sequences still
    run through it a layer at a time with the build's own tools (engines/build/stream.py), as a float build's do."""
    from transformers import AutoTokenizer

    from engines.torch.loader import eos_token_ids, pick_dtype

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
        kv = stored.kv_dtype if stored.kv_scales is not None else auto_kv(hardware)
    cand = Candidate(precision, kv, None, reference=REFERENCE, calibrated=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if target is not None:
        check_same_vocabulary(tokenizer, target)
    calib_requests = calibration.select_samples(
        calibration.load_chat_requests(options.calib or calibration.default_calibration_path()), options.calib_samples
    )
    eval_requests = calibration.load_chat_requests(calibration.default_eval_path())[: options.eval_samples]
    output = Path(options.output).expanduser()
    build_hash = compute_build_hash(options, folder, [cand], hardware, calib_requests, eval_requests)
    if (existing := up_to_date_engine(output, build_hash, options.force)) is not None:
        return BuildResult(output, True, existing)

    args = stored.args
    reference = arch.assemble(args, dict(stored.tensors), stored.formats, FP32, device)
    calib_prompts = calibration.render_prompts(calib_requests, tokenizer, CALIB_MAX_TOKENS)
    eval_prompts = calibration.render_prompts(eval_requests, tokenizer, CALIB_MAX_TOKENS)
    details: dict[str, object] = {"prequantized": stored.method}
    kv_scales, calib_seconds = None, 0.0
    if kv in KV_CODE_MAX:
        if stored.kv_scales is not None:
            kv_scales = convert_kv_scales(stored.kv_scales, stored.kv_dtype, kv)
            details["kv_scales"] = f"the checkpoint's ({stored.kv_dtype})"
        else:
            t0 = time.perf_counter()
            kv_scales = _calibrated_kv_scales(reference, calib_prompts, options.calibrator, kv, device)
            calib_seconds = time.perf_counter() - t0
            cand.calibrated = True
            details["kv_scales"] = f"calibrated ({options.calibrator})"

    eos = eos_token_ids(loaded_model(reference, hf_config, tokenizer, folder, FP32, device))
    answers = greedy_answers(reference, eval_prompts, options.eval_tokens, eos, device, progress=options.progress)
    sequences = [p + a for p, a in zip(eval_prompts, answers)]
    rows = answer_rows(eval_prompts, answers)
    test_dtype = engine_dtype(precision, pick_dtype("auto", device))
    model = arch.assemble(args, dict(stored.tensors), stored.formats, test_dtype, device)
    accuracy = _accuracy(reference, model, sequences, rows, answers, kv, kv_scales, test_dtype, device)
    del model
    if options.max_accuracy_loss is not None and accuracy.kl_mean > options.max_accuracy_loss:
        raise BuildError(
            f"the checkpoint's stored weights with a {kv} KV cache measure mean KL {accuracy.kl_mean:.4f} "
            f"against their own float-KV answers, over --max-accuracy-loss {options.max_accuracy_loss}; raise the "
            "budget or pick another --kv-cache-dtype."
        )
    parts = output.with_name(output.name + f".parts{os.getpid()}")
    try:
        shards = Shards(parts / precision)
        shards.add(stored.tensors if kv_scales is None else {**stored.tensors, "kv_cache.scales": kv_scales})
        cand.built = BuiltCandidate(shards, stored.formats, accuracy, kv_scales, {}, details, calib_seconds)
        speeds = []
        if options.bench:
            speeds = measure_speed(args, cand, hf_config, tokenizer, folder, device, test_dtype)
        calib_tokens = sum(len(p) for p in calib_prompts)
        manifest = write_engine(
            output,
            folder,
            options,
            hardware,
            args,
            hf_config,
            cand,
            [cand],
            build_hash,
            calib_requests,
            calib_tokens,
            speeds,
            started,
            target,
        )
    finally:
        shutil.rmtree(parts, ignore_errors=True)
    return BuildResult(output, False, manifest, json.loads((output / "build-report.json").read_text()))


def _final_hidden(
    model: CausalLM,
    sequences: list[list[int]],
    rows: list[slice],
    dtype: torch.dtype,
    device: torch.device,
    kv: str = "model",
    kv_scales: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """The model's final hidden states at rows[k] of sequence k, each sequence run through its layers one at a time
    (a LayerRunner per layer's KV cache: the cache dtype and, quantized, that layer's scales)."""
    runner = LayerRunner(model, dtype, device, max(len(s) for s in sequences))
    outputs = []
    for x, wanted in zip(embed(model, sequences, device), rows):
        out = x
        for i, layer in enumerate(model.layers):
            runner.use_kv_cache(kv, None if kv_scales is None else kv_scales[i])
            x, out = runner.forward(layer, x)
        outputs.append(out[wanted])
    return outputs


@torch.inference_mode()
def _accuracy(
    reference: CausalLM, model: CausalLM, sequences, rows, answers, kv: str, kv_scales, dtype, device
) -> Accuracy:
    ref = _final_hidden(reference, sequences, rows, FP32, device)
    got = _final_hidden(model, sequences, rows, dtype, device, kv, kv_scales)
    return compare(reference, ref, model, got, answers)


def _calibrated_kv_scales(
    model: CausalLM, prompts: list[list[int]], calibrator: str, kv: str, device: torch.device
) -> torch.Tensor:
    """[layers, 2, kv_heads]: each layer's KV range on the calibration prompts (float32, float KV cache) over the
    quantized dtype's largest code, as a float build calibrates its KV cache."""
    runner = LayerRunner(model, FP32, device, max(len(p) for p in prompts))
    xs = embed(model, prompts, device)
    scales = []
    for i, layer in enumerate(model.layers):
        calib = calibrate_layer(runner, i, xs, Needs(kv=True))
        scales.append((calib.kv_range(calibrator).clamp(min=1e-6) / KV_CODE_MAX[kv]).float())
        xs = [runner.forward(layer, x)[0] for x in xs]
    return torch.stack(scales)


def _stored_dtype(hf_config) -> torch.dtype:
    """The dtype config.json says the float tensors (embeddings, norms, an unquantized LM head) are stored in, so
    the engine keeps them as they are; float32 (exact for any float dtype) where it says none."""
    value = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32
