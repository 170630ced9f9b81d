"""One candidate precision built a layer at a time: each decoder layer is calibrated, quantized, stored and evaluated
before the next is read, so the build holds one float layer and one quantized layer, never the model.

For layer i:
1. read its float32 tensors and run the calibration prompts' residual streams through it, recording what the scheme
   and a quantized KV cache need (calibrate.calibrate_layer);
2. quantize it (quantize.quantize_layer) and store its tensors as one shard (shards.Shards);
3. load the quantized layer in the engine's dtype, with its KV cache quantized as the engine's will be, and run the
   calibration and the held-out sequences through it.
So layer i+1 is calibrated on the quantized model's outputs, not the float model's (GPTQ implementations' order:
each layer's statistics include the error of the quantized layers before it, which its quantization then partly
corrects), and after the last layer the held-out sequences hold the quantized model's outputs, which
evaluate.compare measures against the float model's. Each candidate thus makes its own pass over the checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from engines import schemes
from engines.build.calibrate import LayerCalibration, ProjectionStats, calibrate_layer
from engines.build.evaluate import Accuracy, compare
from engines.build.quantize import model_formats, needs_for, quantize_layer, quantize_outer
from engines.build.shards import Shards
from engines.build.stream import FP32, Checkpoint, LayerRunner, embed
from engines.schemes import QuantizeContext
from engines.torch.models.protocol import CausalLM

KV_CODE_MAX = {"int8": 127.0, "fp8": 448.0}  # the largest code of each quantized KV dtype


@dataclass
class HeldOut:
    """The evaluation set as the float model answered it: prompt + answer per prompt, the rows whose next token is
    an answer token, the answers, and the float model's final hidden states at those rows."""

    sequences: list[list[int]]
    rows: list[slice]
    answers: list[list[int]]
    reference: list[torch.Tensor]


@dataclass
class BuiltCandidate:
    shards: Shards  # the engine's weights.safetensors, in shards (kv_cache.scales included)
    formats: dict[str, str]
    accuracy: Accuracy
    kv_scales: torch.Tensor | None  # [layers, 2, kv_heads]
    group_sizes: dict[str, int] = field(default_factory=dict)
    details: dict[str, object] = field(default_factory=dict)
    calibration_seconds: float = 0.0
    quantize_seconds: float = 0.0


def build_candidate(
    checkpoint: Checkpoint,
    float_shell: CausalLM,
    precision: str,
    kv_cache_dtype: str,
    calibrator: str,
    group_size: int,
    dtype: torch.dtype,
    calib_prompts: list[list[int]],
    held_out: HeldOut,
    shards: Shards,
    progress: bool = True,
) -> BuiltCandidate:
    """Quantize the checkpoint at `precision` (its engine running in `dtype`, with a `kv_cache_dtype` KV cache) into
    `shards`, and measure it on `held_out`. float_shell: the checkpoint's float32 shell (Checkpoint.shell)."""
    args, device = checkpoint.args, checkpoint.device
    scheme = schemes.get(precision)
    needs = needs_for(precision, kv_cache_dtype)
    formats = model_formats(args, scheme)
    outer = quantize_outer(checkpoint.outer(), scheme)
    shards.add(outer)
    shell = checkpoint.shell(dict(outer), formats, dtype)
    del outer
    longest = max(len(s) for s in calib_prompts + held_out.sequences)
    calib_xs = embed(shell, calib_prompts, device) if needs.anything else []
    eval_xs = embed(shell, held_out.sequences, device)
    float_runner = LayerRunner(float_shell, FP32, device, longest)
    runner = LayerRunner(shell, dtype, device, longest)

    current: dict[str, ProjectionStats] = {}

    def stats(name: str) -> ProjectionStats:
        if name not in current:
            raise RuntimeError(f"{precision} needs calibration statistics")
        return current[name]

    ctx = QuantizeContext(stats, group_size, scheme.store_dtype())
    group_sizes: dict[str, int] = {}
    seconds = {"calibration": 0.0, "quantize": 0.0}
    kv_scales: list[torch.Tensor] = []
    test_hidden: list[torch.Tensor] = []
    last = args.num_layers - 1
    for i in tqdm(range(args.num_layers), desc=f"build {precision}", unit="layer", disable=not progress):
        tensors = checkpoint.layer(i)
        calibration = None
        if needs.anything:
            t0 = time.perf_counter()
            float_runner.load(i, dict(tensors), {})
            calibration = calibrate_layer(float_runner, i, calib_xs, needs)
            float_shell.unload_layer(i)
            current.clear()
            current.update(calibration.projections)
            seconds["calibration"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        stored = quantize_layer(tensors, i, args, scheme, ctx, group_sizes)
        del tensors
        scales = None
        if kv_cache_dtype in KV_CODE_MAX:
            scales = _kv_scales(calibration, calibrator, kv_cache_dtype)
            kv_scales.append(scales)
        seconds["quantize"] += time.perf_counter() - t0
        shards.add(stored)
        runner.use_kv_cache(kv_cache_dtype, scales)
        layer = runner.load(i, stored, formats)
        if i < last:
            calib_xs = [runner.forward(layer, x)[0] for x in calib_xs]
        for k, x in enumerate(eval_xs):
            eval_xs[k], out = runner.forward(layer, x)
            if i == last:
                test_hidden.append(out[held_out.rows[k]])
        shell.unload_layer(i)
        current.clear()
    scales_all = torch.stack(kv_scales) if kv_scales else None
    if scales_all is not None:
        shards.add({"kv_cache.scales": scales_all})
    return BuiltCandidate(
        shards,
        formats,
        compare(float_shell, held_out.reference, shell, test_hidden, held_out.answers),
        scales_all,
        group_sizes,
        scheme.details(ctx),
        seconds["calibration"],
        seconds["quantize"],
    )


def _kv_scales(calibration: LayerCalibration | None, calibrator: str, kv_cache_dtype: str) -> torch.Tensor:
    """One layer's static KV-cache scales [2, kv_heads]: the calibrator's threshold over the largest code."""
    if calibration is None:
        raise RuntimeError("the calibration pass did not record the KV cache")
    amax = calibration.kv_range(calibrator).clamp(min=1e-6)
    return (amax / KV_CODE_MAX[kv_cache_dtype]).float()
