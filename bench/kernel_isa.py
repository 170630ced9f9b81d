"""kiln's CPU kernels at each ISA level this CPU has, against their torch fallback.

Each kernel (rms_norm, silu_mul, rope_kv, argmax, token_mask, paged decode attention; int8 / int4 weight-only
linear) is built once per level (isa_variants.py: AVX-512, AVX2); this times every build the CPU runs and the
torch code used without one (for int_linear its fallback: dequantize, then F.linear), on SmolLM2-135M's shapes
(hidden 576, intermediate 1536, 9 query and 3 KV heads of 64, vocabulary 49152), at decode and prefill sizes, in
bf16 and in fp32 (the dtype on CPUs without native bf16). Paged attention's torch code is
attention._decode_reference; its AVX-512 build uses AVX512-BF16 dot products for bf16 caches where the CPU has
them. One thread (torch.set_num_threads(1)), so that the figures compare code, not a shared machine's cores.
The torch fallback runs ATen's own vector code for the CPU it finds (AVX-512 on an AVX-512 CPU); what an AVX2
CPU's fallback does is measured with ATEN_CPU_CAPABILITY=avx2 in the environment (the header says which ran).

    python -m bench.kernel_isa [--seconds 0.2]

Prints a Markdown table (median µs per call; speed-up over torch) and writes JSON and a PNG to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

import numpy as np
import torch
import xgrammar as xgr

from bench.event_loop import RESULTS, cpu_model
from engines.quant.rtn import quantize_rtn
from engines.torch.attention import AttentionMetadata, _decode_reference, write_kv
from engines.torch.kernels import (
    argmax,
    extension,
    int_linear,
    paged_attention,
    rms_norm,
    rope_kv,
    silu_mul,
    token_mask,
)
from engines.torch.kernels.isa_variants import LEVELS
from engines.torch.models.llama import _rotate

HIDDEN, INTER, H, KVH, D, VOCAB = 576, 1536, 9, 3, 64, 49152
NB, BS = 64, 16  # KV blocks of the rope_kv case: room for 1024 tokens
ATTENTION_CONTEXT = 512  # tokens per sequence in the paged attention cases
MODULES = (rms_norm, silu_mul, rope_kv, argmax, token_mask, int_linear, paged_attention)


def median_us(fn: Callable[[], object], seconds: float) -> float:
    """Median of per-call times over batches of calls that together run about `seconds`."""
    fn()  # first call: lazy allocations stay out
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    per_batch = max(1, int(0.01 / once))  # batches of ~10 ms, so the timer's own cost does not count
    samples = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(samples) < 5:
        t0 = time.perf_counter()
        for _ in range(per_batch):
            fn()
        samples.append((time.perf_counter() - t0) / per_batch * 1e6)
    return float(np.median(samples))


def force(module, level: str | None) -> None:
    """Make `module`'s functions use this level's build (None: the torch fallback) until the next force()."""
    variants = module._EXT
    variants.module = variants.variants[level].get() if level else None
    variants.level, variants.decided_for = level, extension.cpu_flags()


def rope_torch(qkv, cos, sin, positions, slots, cache):
    """What the model runs without the kernel: llama._rotate, then attention.write_kv."""
    t = qkv.shape[0]
    qk = _rotate(qkv[:, : (H + KVH) * D].view(t, H + KVH, D), cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))
    write_kv(cache, qk[:, H:], qkv[:, (H + KVH) * D :].view(t, KVH, D), slots)
    return qk[:, :H]


def attention_case(batch: int, dtype: torch.dtype, gen: torch.Generator):
    """Decode attention over ATTENTION_CONTEXT tokens per sequence, in shuffled blocks of a cache of `dtype`."""
    per_seq = ATTENTION_CONTEXT // BS
    cache = torch.randn(2, KVH, batch * per_seq, BS, D, generator=gen).to(dtype)
    q = torch.randn(batch, H, D, generator=gen).to(dtype)
    tables = torch.randperm(batch * per_seq, generator=gen).view(batch, per_seq)
    lens = torch.full((batch,), ATTENTION_CONTEXT, dtype=torch.int64)
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.int64),
        num_decode_tokens=batch,
        decode_block_tables=tables,
        decode_context_lens=lens,
        decode_max_context=ATTENTION_CONTEXT,
        prefills=[],
    )
    return (
        lambda: paged_attention.decode_attention(q, cache, tables, lens, D**-0.5),
        lambda: _decode_reference(q, cache, meta, D**-0.5),
    )


def cases(rows_decode: int, rows_prefill: int):
    """(name, kernel module, kernel call, torch call) for each case."""
    gen = torch.Generator().manual_seed(0)

    def bf16(*shape):
        return torch.randn(*shape, generator=gen).to(torch.bfloat16)

    out = []
    for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        w = bf16(HIDDEN).to(dtype)
        for rows in (rows_decode, rows_prefill):
            x, d, gate_up = bf16(rows, HIDDEN).to(dtype), bf16(rows, HIDDEN).to(dtype), bf16(rows, 2 * INTER).to(dtype)
            out += [
                (f"rms_norm {tag} [{rows}, {HIDDEN}]", rms_norm, lambda x=x, w=w: rms_norm.rms_norm(x, w, 1e-5), None),
                (
                    f"add_rms_norm {tag} [{rows}, {HIDDEN}]",
                    rms_norm,
                    lambda x=x, d=d, w=w: rms_norm.add_rms_norm(x, d, w, 1e-5),
                    None,
                ),
                (f"silu_mul {tag} [{rows}, {2 * INTER}]", silu_mul, lambda g=gate_up: silu_mul.silu_mul(g), None),
            ]
    for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for batch in (1, 8):
            kernel_call, torch_call = attention_case(batch, dtype, gen)
            out.append(
                (
                    f"paged_attention {tag} [{batch} x {ATTENTION_CONTEXT} tokens]",
                    paged_attention,
                    kernel_call,
                    torch_call,
                )
            )
    cos, sin = bf16(1024, D), bf16(1024, D)
    for rows in (rows_decode, rows_prefill):
        qkv = bf16(rows, (H + 2 * KVH) * D)
        positions, slots = torch.arange(rows), torch.randperm(NB * BS, generator=gen)[:rows]
        cache = torch.zeros(2, KVH, NB, BS, D, dtype=torch.bfloat16)
        args = (qkv, cos, sin, positions, slots, cache)
        out.append(
            (
                f"rope_kv [{rows} tokens]",
                rope_kv,
                lambda a=args: rope_kv.rope_store(*a, None, "model", H, KVH),
                lambda a=args: rope_torch(*a),
            )
        )
    for rows in (1, 32):
        logits = torch.randn(rows, VOCAB, generator=gen)
        bitmask = xgr.allocate_token_bitmask(rows, VOCAB).random_(-(2**31), 2**31 - 1, generator=gen)
        out += [
            (f"argmax [{rows}, {VOCAB}]", argmax, lambda x=logits: argmax.argmax_rows(x), None),
            (
                f"token_mask [{rows}, {VOCAB}]",
                token_mask,
                lambda x=logits, b=bitmask: token_mask.apply_token_bitmask(x, b),
                None,
            ),
        ]
    weight = torch.randn(2 * INTER, HIDDEN, generator=gen) * 0.05  # the fused gate_up projection
    q8 = quantize_rtn(weight, 8)
    q4 = quantize_rtn(weight, 4, group_size=32, symmetric=False)
    p4 = int_linear.pack_int4(q4.qweight)
    s8 = q8.scales.reshape(-1)
    for rows in (1, 8):
        x = bf16(rows, HIDDEN)
        out += [
            (
                f"int8_linear [{rows}, {HIDDEN}] x [{2 * INTER}]",
                int_linear,
                lambda x=x: int_linear.int8_linear(x, q8.qweight, s8),
                None,
            ),
            (
                f"int4_linear g32 [{rows}, {HIDDEN}] x [{2 * INTER}]",
                int_linear,
                lambda x=x: int_linear.int4_linear(x, p4, q4.scales, q4.zeros, 32),
                None,
            ),
        ]
    return out


def plot(results: list[dict], levels: list[str], title: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4.8))
    ys = np.arange(len(results))
    height = 0.8 / len(levels)
    for i, level in enumerate(levels):
        speedups = [r["torch_us"] / r[f"{level}_us"] for r in results]
        ax.barh(ys + i * height, speedups, height, label=level)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(ys + height * (len(levels) - 1) / 2, [r["case"] for r in results])
    ax.invert_yaxis()
    ax.set(xlabel="speed-up over the torch fallback (log)", xscale="log", title=title)
    ax.grid(alpha=0.3, axis="x")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=0.2, help="timing per kernel, level and case")
    parser.add_argument("--prefill-rows", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    have = extension.cpu_flags()
    levels = [level.name for level in LEVELS if all(flag in have for flag in level.cpu_flags)]
    load = os.getloadavg()
    aten = torch.backends.cpu.get_cpu_capability()
    print(
        f"# kernels per ISA level: {cpu_model()}, levels {levels}, torch fallback on ATen {aten}, 1 thread, "
        f"load {load[0]:.2f}",
        flush=True,
    )
    results = []
    for name, module, kernel_call, torch_call in cases(1, args.prefill_rows):
        row = {"case": name}
        for level in [*levels, None]:
            force(module, level)
            call = torch_call if level is None and torch_call is not None else kernel_call
            row[f"{level or 'torch'}_us"] = median_us(call, args.seconds)
        results.append(row)
    for module in MODULES:  # back to load-time selection
        module._EXT.decided_for = None

    head = "| case | torch µs | " + " | ".join(f"{lv} µs | {lv} x" for lv in levels) + " |"
    lines = [head, "|---|---:|" + "---:|---:|" * len(levels)]
    for r in results:
        cells = " | ".join(f"{r[f'{lv}_us']:,.1f} | {r['torch_us'] / r[f'{lv}_us']:.1f}" for lv in levels)
        lines.append(f"| {r['case']} | {r['torch_us']:,.1f} | {cells} |")
    print("\n".join(lines))

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    stem = RESULTS / f"kernel_isa-aten_{aten.lower()}-{stamp}"
    json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png")
    meta = {"cpu": cpu_model(), "levels": levels, "aten_cpu_capability": aten, "threads": 1, "loadavg": load}
    meta["torch"] = torch.__version__
    json_path.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    plot(results, levels, f"kiln kernels per ISA vs torch on ATen {aten}, {cpu_model()}", png_path)
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
