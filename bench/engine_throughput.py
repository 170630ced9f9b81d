"""Offline engine throughput (no HTTP): kiln's torch engine vs Hugging Face transformers `generate`.

Default model, fixed-length prompts and outputs (ignore_eos), concurrency 1, 8, 32, in bfloat16 and
float32; in the same run transformers generates batch-1 sequentially and as padded static batches.
Prints a Markdown table and writes JSON (and a PNG plot) to bench/results/.

    .venv/bin/python -m bench.engine_throughput                 # the full table
    .venv/bin/python -m bench.engine_throughput --dtypes bfloat16 --concurrency 1 32 --no-hf
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from engines.base import GenerationRequest, SamplingParams
from engines.config import EngineConfig
from engines.torch.loader import build_core, load_model

RESULTS = Path(__file__).parent / "results"
MEM_BANDWIDTH = 33e9  # bytes/s, measured on this machine kind (docs/performance.md, "Machine limits")
BF16_FLOPS = 130e9


def make_prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    # Distinct random prompts: no two share a first block, so prefix caching cannot flatter the figures.
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab - 100, (length,), generator=gen).tolist() for _ in range(count)]


def run_kiln(loaded, concurrency: int, prompts, new_tokens: int) -> dict:
    core = build_core(EngineConfig(kv_cache_memory=2 << 30, max_num_seqs=max(concurrency, 1)), loaded)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    # warm-up: one short request, so one-time allocations are not timed
    core.add_request(
        GenerationRequest("warm", prompts[0][:16], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    )
    while core.has_work():
        core.step()
    waves = [prompts[i : i + concurrency] for i in range(0, len(prompts), concurrency)]
    generated = 0
    ttfts, decode_time, decode_tokens = [], 0.0, 0
    start = time.perf_counter()
    for w, wave in enumerate(waves):
        for i, p in enumerate(wave):
            core.add_request(GenerationRequest(f"{w}-{i}", p, params))
        wave_start = time.perf_counter()
        first_done = None
        while core.has_work():
            t0 = time.perf_counter()
            outs = core.step()
            dt = time.perf_counter() - t0
            n = sum(len(c.new_token_ids) for o in outs for c in o.outputs)
            generated += n
            if first_done is None and n == len(wave):
                first_done = time.perf_counter()
                ttfts.append(first_done - wave_start)
            elif first_done is not None:
                decode_time += dt
                decode_tokens += n
    elapsed = time.perf_counter() - start
    return {
        "tok_s": generated / elapsed,
        "decode_tok_s": decode_tokens / decode_time if decode_time else None,
        "ttft_s": sum(ttfts) / len(ttfts),
        "elapsed_s": elapsed,
        "generated": generated,
    }


def run_hf(hf_model, batch: int, prompts, new_tokens: int) -> dict:
    generated = 0
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        ids = torch.tensor(prompts[i : i + batch])  # equal lengths: padding is a no-op but the batch is static
        with torch.no_grad():
            out = hf_model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        generated += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    elapsed = time.perf_counter() - start
    return {"tok_s": generated / elapsed, "elapsed_s": elapsed, "generated": generated}


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--requests-at-1", type=int, default=2, help="sequential requests measured at concurrency 1")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--hf-batches", nargs="+", type=int, default=[1, 8, 32])
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    rows = []
    for dtype_name in args.dtypes:
        loaded = load_model(EngineConfig(dtype=dtype_name))
        wbytes = weight_bytes(loaded.model)
        vocab = loaded.model.args.vocab_size
        for c in args.concurrency:
            prompts = make_prompts(c if c > 1 else args.requests_at_1, args.prompt_len, vocab, seed=c)
            r = run_kiln(loaded, c, prompts, args.new_tokens)
            # every decode step streams all weights once; at batch c the step makes c tokens
            decode = r["decode_tok_s"] or r["tok_s"]
            bw = decode / c * wbytes
            flops = (
                decode * 2 * wbytes / loaded.model.embed_tokens.weight.element_size()
            )  # 2 FLOPs per weight per token
            rows.append(
                {
                    "engine": "kiln",
                    "dtype": dtype_name,
                    "concurrency": c,
                    **r,
                    "weight_bytes": wbytes,
                    "decode_weight_GBs": bw / 1e9,
                    "pct_of_mem_bw": 100 * bw / MEM_BANDWIDTH,
                    "decode_GFLOPs": flops / 1e9,
                    "pct_of_bf16_flops": 100 * flops / BF16_FLOPS,
                }
            )
            print(f"kiln {dtype_name} c={c}: {r['tok_s']:.1f} tok/s (decode {r['decode_tok_s'] or 0:.1f})", flush=True)
        if not args.no_hf:
            hf = AutoModelForCausalLM.from_pretrained(loaded.folder, dtype=loaded.dtype).eval()
            for b in args.hf_batches:
                prompts = make_prompts(b if b > 1 else args.requests_at_1, args.prompt_len, vocab, seed=b)
                r = run_hf(hf, b, prompts, args.new_tokens)
                rows.append({"engine": "transformers", "dtype": dtype_name, "concurrency": b, **r})
                print(f"transformers {dtype_name} batch={b}: {r['tok_s']:.1f} tok/s", flush=True)
            del hf
        del loaded

    table = render(rows)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
    }
    (RESULTS / "engine_throughput.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / "engine_throughput.md").write_text(table + "\n")
    plot(rows, RESULTS / "engine_throughput.png")


def render(rows: list[dict]) -> str:
    lines = [
        "| engine | dtype | concurrency | output tok/s | decode tok/s | TTFT s | weights GB/s in decode (% of 33 GB/s) "
        "| matmul GFLOP/s in decode (% of 130) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        dec = f"{r['decode_tok_s']:.1f}" if r.get("decode_tok_s") else "–"
        ttft = f"{r['ttft_s']:.3f}" if "ttft_s" in r else "–"
        bw = f"{r['decode_weight_GBs']:.1f} ({r['pct_of_mem_bw']:.0f}%)" if "decode_weight_GBs" in r else "–"
        fl = f"{r['decode_GFLOPs']:.0f} ({r['pct_of_bf16_flops']:.0f}%)" if "decode_GFLOPs" in r else "–"
        lines.append(
            f"| {r['engine']} | {r['dtype']} | {r['concurrency']} | {r['tok_s']:.1f} | {dec} | {ttft} | {bw} | {fl} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in sorted({(r["engine"], r["dtype"]) for r in rows}):
        pts = sorted((r["concurrency"], r["tok_s"]) for r in rows if (r["engine"], r["dtype"]) == key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]} {key[1]}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency (transformers: static batch)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("SmolLM2-135M offline throughput, 128-token prompts, 128 new tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
