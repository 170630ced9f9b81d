"""build-report.md: the build report as a person reads it (build-report.json holds the same)."""

from __future__ import annotations

from pathlib import Path


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def report_row(r: dict) -> dict:
    """One engine's figures as the cells of the comparison table (also used by bench/build_matrix.py)."""
    acc = r["accuracy"]
    speed = {s["concurrency"]: s["decode_tok_s"] for s in r.get("speed", [])}
    return {
        "precision": r["precision"],
        "KV": r["kv_cache_dtype"],
        "weights": _mb(r["weight_bytes"]),
        "vs bf16": f"{r['weight_ratio_to_bf16']:.2f}",
        "KV tokens/GiB": f"{r['kv_tokens_per_gib']:,}",
        "build s": f"{r['build_seconds']:.0f}",
        "mean KL": f"{acc['kl_mean']:.4f}",
        "top-1 %": f"{100 * acc['top1_agreement']:.1f}",
        "ppl": f"{acc['perplexity']:.3f}",
        "decode tok/s c=1": "-" if 1 not in speed else f"{speed[1]:.1f}",
        "decode tok/s c=32": "-" if 32 not in speed else f"{speed[32]:.1f}",
    }


def markdown_table(rows: list[dict]) -> str:
    heads = list(rows[0])
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    lines += ["| " + " | ".join(str(row[h]) for h in heads) + " |" for row in rows]
    return "\n".join(lines)


def write_report(path: Path, r: dict, budget: float | None) -> None:
    acc = r["accuracy"]
    lines = [
        f"# kiln build report: {r['model']} {r['precision']} (KV cache {r['kv_cache_dtype']})",
        "",
        f"Built on {r['hardware']} in {r['build_seconds']:.0f} s (calibration {r['calibration_seconds']:.0f} s, "
        f"quantization {r['quantize_seconds']:.0f} s)" + (f", profile {r['profile']}." if r["profile"] else "."),
        "",
        markdown_table([report_row(r)]),
        "",
        f"Accuracy against {r.get('reference', 'the unquantized float32 model')} on {acc['prompts']} held-out prompts "
        f"({acc['positions']} answer positions of the reference's own greedy answers): mean KL divergence of the "
        f"next-token distributions, how often both pick the same top token, and the perplexity of those answers "
        f"(the reference's own: {acc['reference_perplexity']:.3f}).",
        "",
        f"KV tokens/GiB: tokens a 1 GiB KV pool holds ({r['kv_bytes_per_token']:,} bytes per token). Decode tok/s: "
        "greedy, 64 new tokens per request after 32-token prompts, measured at the end of the build on this machine.",
    ]
    if len(r["candidates"]) > 1:
        lines += ["", f"Chosen as the most aggressive precision within --max-accuracy-loss {budget} (mean KL):", ""]
        lines += [
            f"- {c['profile'] or c['precision']} ({c['precision']}, KV {c['kv_cache_dtype']}): "
            + ("not tried" if c["kl_mean"] is None else f"mean KL {c['kl_mean']:.4f}")
            for c in r["candidates"]
        ]
    if r.get("details"):
        lines += ["", "Details: " + ", ".join(f"{k} {v}" for k, v in r["details"].items()) + "."]
    path.write_text("\n".join(lines) + "\n")
