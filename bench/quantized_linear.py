"""Cold-weights stack benchmark: bf16 F.linear vs the quantized runtime linear layers.

A SmolLM2-135M-shaped stack: 30 layers x ([960x576], [576x576], [3072x576], [576x1536]) as distinct
tensors, plus the [49152x576] LM head, all [N x K]. Each layer's weights are separate, so every pass
streams the whole stack from memory (no cache reuse), like one decode step. Reports ms per stack
(median) and effective GB/s = weight bytes read / time, as a Markdown table.

    python -m bench.quantized_linear [--reps 7] [--ms 1,8,32] [--threads N]

The int8 / int4 rows measure the layers as the engine runs them: kiln's AVX-512 kernels
(engines/torch/kernels/int_linear) for M <= SMALL_M_MAX_INT8/INT4 where available, torch's kernels or
dequantize + F.linear above. bench/kernel_int_linear.py compares the kernels with torch's directly.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from engines.quant.fp8 import quantize_fp8
from engines.quant.rtn import quantize_rtn
from engines.torch.layers.quantized import (
    Fp8Linear,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    W8A8Int8Linear,
)

LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # [N, K]
N_LAYERS = 30
LM_HEAD = (49152, 576)


class _Fn:
    """A plain function with the in_features attribute the timing loop reads."""

    def __init__(self, fn, k):
        self.fn, self.in_features = fn, k

    def __call__(self, x):
        return self.fn(x)


def int4_group(k: int) -> int:
    return 128 if k % 128 == 0 else 64  # K=576 is not a multiple of 128


def build(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [s for _ in range(N_LAYERS) for s in LAYER_SHAPES] + [LM_HEAD]
    stacks = {"bf16 F.linear": [], "int8 W8A16": [], "int4 W4A16": [], "W8A8 _int_mm": [], "fp8 upcast": []}
    for n, k in shapes:
        w = torch.randn(n, k, generator=g) * 0.05
        wb = w.to(torch.bfloat16)
        stacks["bf16 F.linear"].append((_Fn(lambda x, wb=wb: F.linear(x, wb), k), wb.numel() * 2))
        q8 = quantize_rtn(w, 8)
        l8 = Int8WeightOnlyLinear.from_quantized(q8)
        stacks["int8 W8A16"].append((l8, l8.weight_bytes))
        l4 = Int4WeightOnlyLinear.from_quantized(quantize_rtn(w, 4, group_size=int4_group(k)))
        stacks["int4 W4A16"].append((l4, l4.weight_bytes))
        la = W8A8Int8Linear.from_quantized(q8)  # shares the int8 codes with l8
        stacks["W8A8 _int_mm"].append((la, la.weight_bytes))
        wf, sf = quantize_fp8(w, per_channel=True)
        lf = Fp8Linear.from_quantized(wf, sf)
        stacks["fp8 upcast"].append((lf, lf.weight_bytes))
        del w
    return stacks


def time_stack(layers, m: int, reps: int) -> float:
    xs = {k: torch.randn(m, k).to(torch.bfloat16) for k in {576, 1536}}
    ts = []
    with torch.inference_mode():
        for i in range(reps + 2):  # 2 warm-up passes
            t0 = time.perf_counter()
            for fn, _ in layers:
                fn(xs[fn.in_features])
            dt = time.perf_counter() - t0
            if i >= 2:
                ts.append(dt)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--ms", default="1,8,32")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ms = [int(v) for v in args.ms.split(",")]
    wrapped = build()
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{len(next(iter(wrapped.values())))} layers, median of {args.reps}\n"
    )
    header = "| path | MB/stack | " + " | ".join(f"M={m} ms | M={m} GB/s" for m in ms) + " |"
    print(header)
    print("|" + "---|" * (2 + 2 * len(ms)))
    for name, layers in wrapped.items():
        nbytes = sum(b for _, b in layers)
        cells = []
        for m in ms:
            t = time_stack(layers, m, args.reps)
            cells += [f"{t * 1e3:.1f}", f"{nbytes / t / 1e9:.1f}"]
        print(f"| {name} | {nbytes / 1e6:.0f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
