"""Cold-weight decode matmuls, weight-only int8 / int4: torch's CPU kernels vs engines/torch/kernels/int_linear.

One "stack" is every weight matmul of a SmolLM2-135M decode step as distinct tensors: 30 layers x
(qkv [960x576], o_proj [576x576], gate_up [3072x576], down [576x1536]) + lm_head [49152x576] -- more
than the caches hold, so each pass streams the weights from memory, as decode does. x is bf16. The
bf16 weight-streaming kernel (bf16_linear) on the same shapes is the bar to beat. For each M the
variants run interleaved, stack after stack, so machine noise hits them alike; the table reports medians
of ms per stack and effective GB/s = bytes of weight (codes + scales + zero points) / time.

    .venv/bin/python -m bench.kernel_int_linear                       # M = 1 2 4 8 16
    .venv/bin/python -m bench.kernel_int_linear --wait-idle 600       # on a shared machine
    .venv/bin/python -m bench.kernel_int_linear --ms 8 12 16 24 32 --reps 9 --group 64
    .venv/bin/python -m bench.kernel_int_linear --only "int4 kernel" "int4 torch" --asym

"int8 amx" / "int4 amx" (Intel AMX CPUs only) are engines/torch/kernels/amx_linear's W8A16 / W4A16 paths
on the same codes; "int4 affine panels" / "int8 panels" (AVX512-BF16 only) engines/torch/kernels/panel_linear's.
"dequant+F.linear" rows are the layers' large-M path (dequantize once per call, then F.linear); their
GB/s counts the quantized bytes like the kernel rows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from engines.quant.rtn import quantize_rtn
from engines.torch.kernels import amx_linear, panel_linear
from engines.torch.kernels import bf16_linear as bf16k
from engines.torch.kernels import int_linear as kernel
from engines.torch.layers.quantized import int4_to_torch_cpu_format

LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o_proj, gate_up, down
LM_HEAD = (49152, 576)


def int4_group(k: int, want: int) -> int:
    return want if k % want == 0 else 64  # K=576 is not a multiple of 128


def make_stacks(layers: int, group: int, symmetric: bool):
    gen = torch.Generator().manual_seed(0)
    shapes = [s for _ in range(layers) for s in LAYER_SHAPES] + [LM_HEAD]
    stacks = {name: [] for name in VARIANTS}
    for n, k in shapes:
        w = torch.randn(n, k, generator=gen) * 0.02
        stacks["bf16 kernel"].append(((w.bfloat16(),), k, n * k * 2))
        q8 = quantize_rtn(w, 8)
        s8 = q8.scales.reshape(-1).contiguous()
        stacks["int8 torch"].append(((q8.qweight, s8.bfloat16()), k, n * k + 4 * n))
        stacks["int8 kernel"].append(((q8.qweight, s8), k, n * k + 4 * n))
        if amx_linear.available():
            stacks["int8 amx"].append(((amx_linear.pack(q8.qweight), s8), k, n * k + 4 * n))
        g = int4_group(k, group)
        q4 = quantize_rtn(w, 4, group_size=g, symmetric=symmetric)
        u, sz = int4_to_torch_cpu_format(q4, torch.bfloat16)
        tp = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
        stacks["int4 torch"].append(((tp, g, sz), k, tp.numel() + sz.numel() * 2))
        kp = kernel.pack_int4(q4.qweight)
        zb = 0 if q4.zeros is None else q4.zeros.numel()
        nb4 = kp.numel() + q4.scales.numel() * 4 + zb
        stacks["int4 kernel"].append(((kp, q4.scales.contiguous(), q4.zeros, g), k, nb4))
        if amx_linear.available() and amx_linear.int4_fits(n, k, g):
            a4 = amx_linear.pack_int4(q4.qweight, q4.scales, q4.zeros, g)
            stacks["int4 amx"].append(((*a4, g), k, nb4))
        # GGUF Q4_1 blocks as kiln serves them: unsigned codes, (d, m) per group of 32
        qa = quantize_rtn(w, 4, group_size=32, symmetric=False)
        dm = torch.stack([qa.scales, -(qa.zeros.float() + 8) * qa.scales], dim=-1).half().contiguous()
        ka = kernel.pack_int4(qa.qweight)
        stacks["int4 affine kernel"].append(((ka, dm, 32), k, ka.numel() + dm.numel() * 2))
        if panel_linear.available() and panel_linear.fits_q4_1(n, k, 32):
            codes, dmp = panel_linear.pack_q4_1(kernel.unpack_int4(ka, k).add(8).to(torch.uint8), dm)
            stacks["int4 affine panels"].append(((codes, dmp), k, codes.numel() + dmp.numel() * 2))
        if panel_linear.available() and panel_linear.fits_int8(n, k):
            stacks["int8 panels"].append(stacks["int8 kernel"][-1])
        stacks["int8 dequant+F.linear"].append(stacks["int8 kernel"][-1])
        stacks["int4 dequant+F.linear"].append(stacks["int4 kernel"][-1])
        stacks["int4 affine dequant+F.linear"].append(stacks["int4 affine kernel"][-1])
        del w
    return stacks


VARIANTS = {
    "bf16 kernel": lambda x, a: bf16k.bf16_linear(x, *a),
    "int8 torch": lambda x, a: torch._weight_int8pack_mm(x, *a),
    "int8 kernel": lambda x, a: kernel.int8_linear(x, *a),
    "int8 amx": lambda x, a: amx_linear.amx_int8_linear(x, *a),  # Intel AMX only
    "int4 torch": lambda x, a: torch.ops.aten._weight_int4pack_mm_for_cpu(x, *a),
    "int4 kernel": lambda x, a: kernel.int4_linear(x, *a),
    "int4 amx": lambda x, a: amx_linear.amx_int4_linear(x, *a),  # Intel AMX only
    "int4 affine kernel": lambda x, a: kernel.int4_affine_linear(x, *a),
    # AVX512-BF16 only: 16 weight rows per vector (what AffineInt4Linear runs for every bf16 row there, and
    # Int8WeightOnlyLinear from panel_linear.INT8_MIN_ROWS rows)
    "int4 affine panels": lambda x, a: panel_linear.q4_1_linear(x, *a),
    "int8 panels": lambda x, a: panel_linear.int8_linear(x, *a),
    # the large-M path: dequantize the layer once per call (bf16), then one F.linear
    "int8 dequant+F.linear": lambda x, a: F.linear(x, kernel.int8_dequantize(*a, dtype=x.dtype)),
    "int4 dequant+F.linear": lambda x, a: F.linear(x, kernel.int4_dequantize(*a, k=x.shape[-1], dtype=x.dtype)),
    # what AffineInt4Linear runs for prompt rows where it has no panels
    "int4 affine dequant+F.linear": lambda x, a: F.linear(
        x, kernel.int4_affine_dequantize(*a, k=x.shape[-1], dtype=x.dtype)
    ),
}


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over `seconds` (/proc/stat; 0 where unavailable)."""

    def read():
        v = [int(f) for f in open("/proc/stat").readline().split()[1:]]
        return sum(v) - v[3] - v[4], v[3] + v[4]  # busy, idle + iowait

    try:
        b1, i1 = read()
        time.sleep(seconds)
        b2, i2 = read()
    except OSError:
        return 0.0
    return (b2 - b1) / max(1, (b2 - b1) + (i2 - i1))


def time_stack(fn, stack, xs) -> float:
    t = time.perf_counter()
    for args, k, _ in stack:
        fn(xs[k], args)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--reps", type=int, default=11, help="timed stacks per variant and M (median reported)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--group", type=int, default=128, help="int4 group size (64 where it does not divide K)")
    ap.add_argument("--asym", action="store_true", help="int4 with zero points")
    ap.add_argument("--only", nargs="+", default=None, help="variants to run (default: all)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="S",
        help="on a shared machine: before each M, wait up to S seconds for the CPUs to go idle "
        "(other processes preempting one of the 2 OpenMP threads stall every call)",
    )
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if not kernel.available() or not bf16k.available():
        sys.exit("kernels unavailable (see the warning above)")
    print(
        f"kernels ready in {time.perf_counter() - t0:.1f} s; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        file=sys.stderr,
    )
    stacks = make_stacks(args.layers, args.group, not args.asym)
    names = [name for name in args.only or VARIANTS if stacks[name]]  # "int8 amx" needs AMX, the panels AVX512-BF16
    nbytes = {name: sum(b for *_, b in stacks[name]) for name in names}

    rows = []
    with torch.inference_mode():
        for m in args.ms:
            xs = {k: torch.randn(m, k).bfloat16() for k in {s[1] for s in LAYER_SHAPES + [LM_HEAD]}}
            deadline = time.monotonic() + args.wait_idle
            while time.monotonic() < deadline and cpu_busy() > 0.06:
                pass
            for name in names:  # warm-up: first calls, thread pool, page faults
                time_stack(VARIANTS[name], stacks[name], xs)
            times = {name: [] for name in names}
            for _ in range(args.reps):
                for name in names:
                    times[name].append(time_stack(VARIANTS[name], stacks[name], xs))
            rows.append((m, {name: statistics.median(v) for name, v in times.items()}))

    print(
        f"\n{args.layers} layers x 4 + lm_head = {len(stacks[names[0]])} weights per stack; median of {args.reps} "
        f"stacks; {torch.get_num_threads()} threads; int4 group {args.group} (64 where K=576), "
        f"{'asymmetric' if args.asym else 'symmetric'}; cells: ms per stack / effective GB/s\n"
    )
    print("| path | MB/stack | " + " | ".join(f"M={m}" for m, _ in rows) + " |")
    print("|---|---:|" + "---:|" * len(rows))
    for name in names:
        cells = [f"{med[name] * 1e3:.1f} / {nbytes[name] / med[name] / 1e9:.1f}" for _, med in rows]
        print(f"| {name} | {nbytes[name] / 1e6:.0f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
