"""Cold-weight decode matmuls, bf16: F.linear vs oneDNN with a packed weight vs kiln's kernels
(engines/torch/kernels/bf16_linear, AVX-512; amx_linear, Intel AMX where the CPU has it).

One "stack" is every weight matmul of a SmolLM2-135M decode step as distinct tensors: 30 layers x
(qkv [960x576], o_proj [576x576], gate_up [3072x576], down [576x1536]) + lm_head [49152x576],
269 MB of bf16 -- more than the caches hold, so each pass streams the weights from memory, as decode
does. For each M the variants run interleaved, stack after stack, so machine noise (the machine is
shared) hits them alike; the table reports medians. A read-only pass over the same tensors
(`torch.sum` of their bytes seen as float32) is timed alongside as the memory-read reference.

    .venv/bin/python -m bench.kernel_bf16_linear                  # M = 1 2 4 8 16
    .venv/bin/python -m bench.kernel_bf16_linear --ms 8 16 32 64 512 --reps 7

Each variant gets its own copy of the weights in the layout it reads ("oneDNN packed": reordered once
by torch.ops.mkldnn._reorder_linear_weight, as DenseLinear does; "amx_linear": amx_linear.pack).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from engines.torch.kernels import amx_linear
from engines.torch.kernels import bf16_linear as kernel

MEM_BANDWIDTH = 33e9  # bytes/s, fp32 sum, measured on this machine kind (docs/performance.md, "Machine limits")
LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o_proj, gate_up, down
LM_HEAD = (49152, 576)


def make_stack(layers: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = [s for _ in range(layers) for s in LAYER_SHAPES] + [LM_HEAD]
    return [(torch.randn(s, generator=gen) * 0.02).bfloat16() for s in shapes]


def time_stack(fn, stack, xs) -> float:
    t = time.perf_counter()
    for w, k in stack:
        fn(xs[k], w)
    return time.perf_counter() - t


def onednn_packed(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--reps", type=int, default=11, help="timed stacks per variant and M (median reported)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--only", nargs="+", default=None, help="variants to run (default: all)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if not kernel.available():
        sys.exit("bf16_linear kernel unavailable (see the warning above)")
    print(
        f"kernel ready in {time.perf_counter() - t0:.1f} s; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        file=sys.stderr,
    )

    plain = make_stack(args.layers)
    nbytes = sum(w.numel() * w.element_size() for w in plain)
    as_f32 = [w.view(torch.float32) for w in plain]
    variants = {
        "F.linear": (F.linear, plain),
        "bf16_linear": (kernel.bf16_linear, plain),
        "oneDNN packed": (onednn_packed, [torch.ops.mkldnn._reorder_linear_weight(w, 32) for w in plain]),
    }
    if amx_linear.available():
        variants["amx_linear"] = (amx_linear.amx_linear, [amx_linear.pack(w) for w in plain])
    variants = {
        name: (fn, [(w, p.shape[1]) for w, p in zip(ws, plain)])
        for name, (fn, ws) in variants.items()
        if not args.only or name in args.only
    }

    rows, reads = [], []
    for m in args.ms:
        xs = {k: torch.randn(m, k).bfloat16() for k in {s[1] for s in LAYER_SHAPES + [LM_HEAD]}}
        for fn, stack in variants.values():  # warm-up: first calls, thread pool, page faults
            time_stack(fn, stack, xs)
        times = {name: [] for name in variants}
        for _ in range(args.reps):
            for name, (fn, stack) in variants.items():
                times[name].append(time_stack(fn, stack, xs))
            t = time.perf_counter()
            for w in as_f32:
                w.sum()
            reads.append(time.perf_counter() - t)
        rows.append((m, {name: statistics.median(v) for name, v in times.items()}))

    def gbs(t: float) -> str:
        return f"{nbytes / t / 1e9:.1f} ({nbytes / t / MEM_BANDWIDTH:.0%})"

    print(
        f"\n{args.layers} layers x 4 + lm_head = {len(plain)} bf16 weights, {nbytes / 1e6:.0f} MB per stack; "
        f"median of {args.reps} stacks; {torch.get_num_threads()} threads; "
        f"ms, GB/s (% of {MEM_BANDWIDTH / 1e9:.0f} GB/s)\n"
    )
    print("| M | " + " | ".join(f"{name} ms | GB/s" for name in variants) + " |")
    print("|---:|" + "---:|---:|" * len(variants))
    for m, med in rows:
        print(f"| {m} | " + " | ".join(f"{med[name] * 1e3:.1f} | {gbs(med[name])}" for name in variants) + " |")
    r = statistics.median(reads)
    print(f"\nread-only reference (torch.sum over the same weights, same run): {r * 1e3:.1f} ms, {gbs(r)} GB/s")
    print(
        f"fastest per M: {', '.join(f'{m}: {min(med, key=med.get)}' for m, med in rows)}; "
        f"DenseLinear: bf16_linear up to {kernel.SMALL_M_MAX} rows, amx_linear (where available) up to "
        f"{amx_linear.MAX_ROWS}, oneDNN packed otherwise"
    )


if __name__ == "__main__":
    main()
