"""Speculative decoding on the default model: offline engine tok/s with and without it, side by side in one run.

Target: the default model at the machine's dtype (bf16 here). Methods: off; n-gram lookup (k=4);
a draft model, the default model's INT4 (AWQ) build, at k=4 and k=2. Workloads: (a) free-form chat
(held-out requests of build/calibration/eval.jsonl) and (b) rewriting a given paragraph (its long
requests, pasted back with "rewrite this"). Concurrency 1 (requests one after another) and 8 (eight at
once). Greedy, up to --new-tokens per answer, EOS honoured (with and without speculation the answers are
the same text, so tok/s compares like with like).

For each speculative row: acceptance rate (accepted / proposed), α (accepted / checked draft positions,
the per-token acceptance probability of the geometric model), and tokens per verification step measured
(1 + accepted drafts per step) next to what α predicts: (1 - α^(k+1)) / (1 - α).

    .venv/bin/python -m bench.spec_decode                      # builds the INT4 draft once (a few minutes)
    .venv/bin/python -m bench.spec_decode --draft DIR --new-tokens 64 --requests 4

Prints a Markdown table and writes JSON and a PNG to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from engines import calibration
from engines.base import GenerationRequest, SamplingParams
from engines.config import EngineConfig
from engines.torch.loader import build_core, load_draft, load_model

RESULTS = Path(__file__).parent / "results"
REWRITE = "Rewrite the following text, keeping every sentence and detail, with correct punctuation:\n\n{text}"
METHODS = {  # name -> EngineConfig overrides
    "off": {},
    "ngram k=4": dict(speculative_method="ngram", num_speculative_tokens=4),
    "draft int4 k=4": dict(speculative_method="draft", num_speculative_tokens=4),
    "draft int4 k=2": dict(speculative_method="draft", num_speculative_tokens=2),
}


def workloads(tokenizer, count: int) -> dict[str, list[list[int]]]:
    requests = calibration.load_chat_requests(calibration.default_eval_path())
    last = lambda messages: messages[-1]["content"]  # noqa: E731
    chat = [m for m in requests if len(m) <= 2 and len(last(m)) < 300][:count]
    rewrite = [[{"role": "user", "content": REWRITE.format(text=last(m))}] for m in requests if len(last(m)) > 500][
        :count
    ]
    render = lambda rs: calibration.render_prompts(rs, tokenizer, 1024)  # noqa: E731
    return {"chat": render(chat), "rewrite": render(rewrite)}


def ensure_draft(path: Path) -> Path:
    from engines.build.builder import BuildOptions, build

    result = build(
        BuildOptions(
            output=str(path),
            precision="int4-awq",
            kv_cache_dtype="model",
            calib_samples=128,
            eval_samples=16,
            eval_tokens=16,
            bench=False,
        )
    )
    print(f"draft: {result.output} ({'reused' if result.reused else 'built'})", flush=True)
    return result.output


def run(core, prompts: list[list[int]], concurrency: int, new_tokens: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens)
    core.add_request(GenerationRequest("warm", prompts[0][:32], SamplingParams(temperature=0.0, max_tokens=8)))
    while core.has_work():
        core.step()
    before = core.stats()
    generated, steps = 0, 0
    start = time.perf_counter()
    for w in range(0, len(prompts), concurrency):
        for i, p in enumerate(prompts[w : w + concurrency]):
            core.add_request(GenerationRequest(f"{w}-{i}", p, params))
        while core.has_work():
            outs = core.step()
            steps += 1
            generated += sum(len(c.new_token_ids) for o in outs for c in o.outputs)
    elapsed = time.perf_counter() - start
    after = core.stats()
    drafts = after.spec_num_drafts - before.spec_num_drafts
    proposed = after.spec_draft_tokens - before.spec_draft_tokens
    accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
    checked = sum(after.spec_checked_per_position) - sum(before.spec_checked_per_position)
    alpha = accepted / checked if checked else None
    return {
        "tok_s": generated / elapsed,
        "generated": generated,
        "elapsed_s": elapsed,
        "engine_steps": steps,
        "drafts": drafts,
        "proposed": proposed,
        "accepted": accepted,
        "acceptance_rate": accepted / proposed if proposed else None,
        "alpha": alpha,
        "tokens_per_verification": 1 + accepted / drafts if drafts else None,
    }


def expected_tokens_per_step(alpha: float | None, k: int) -> float | None:
    if alpha is None:
        return None
    return k + 1.0 if alpha >= 1.0 else (1 - alpha ** (k + 1)) / (1 - alpha)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draft", help="draft engine directory (default: build the INT4 draft into bench/results/)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=8, help="requests per workload (concurrency 1 runs 4 of them)")
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = ap.parse_args()

    draft_dir = Path(args.draft) if args.draft else ensure_draft(RESULTS / "draft-int4-awq")
    target = load_model(EngineConfig())
    draft = load_draft(EngineConfig(speculative_method="draft", speculative_draft=str(draft_dir)))
    loads = workloads(target.tokenizer, args.requests)
    rows = []
    for workload, prompts in loads.items():
        for c in args.concurrency:
            batch = prompts[: max(4, c)] if c == 1 else prompts[:c]
            for method in args.methods:
                overrides = METHODS[method]
                config = EngineConfig(kv_cache_memory=1 << 30, max_num_seqs=max(c, 1), **overrides)
                core = build_core(config, target, draft if overrides.get("speculative_method") == "draft" else None)
                r = run(core, batch, c, args.new_tokens)
                k = overrides.get("num_speculative_tokens", 0)
                rows.append(
                    {
                        "workload": workload,
                        "concurrency": c,
                        "method": method,
                        "k": k,
                        **r,
                        "expected_tokens_per_verification": expected_tokens_per_step(r["alpha"], k) if k else None,
                    }
                )
                print(
                    f"{workload} c={c} {method}: {r['tok_s']:.1f} tok/s, acceptance "
                    f"{r['acceptance_rate'] if r['acceptance_rate'] is not None else '-'}",
                    flush=True,
                )
    for row in rows:
        base = next(
            b
            for b in rows
            if b["workload"] == row["workload"] and b["concurrency"] == row["concurrency"] and b["method"] == "off"
        )
        row["speedup"] = row["tok_s"] / base["tok_s"]

    table = render(rows)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": str(target.dtype),
        "machine": platform.processor() or platform.machine(),
        "new_tokens": args.new_tokens,
        "draft": str(draft_dir),
    }
    (RESULTS / "spec_decode.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / "spec_decode.md").write_text(table + "\n")
    plot(rows, RESULTS / "spec_decode.png")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(rows: list[dict]) -> str:
    lines = [
        "| workload | concurrency | method | tok/s | vs off | acceptance | α | tokens/step measured | "
        "tokens/step from α |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['concurrency']} | {r['method']} | {r['tok_s']:.1f} | {r['speedup']:.2f}x | "
            f"{_fmt(r['acceptance_rate'], '.2f')} | {_fmt(r['alpha'], '.2f')} | "
            f"{_fmt(r['tokens_per_verification'], '.2f')} | {_fmt(r['expected_tokens_per_verification'], '.2f')} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["workload"], r["concurrency"]) for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(methods)
    for m, method in enumerate(methods):
        values = [
            next((r["tok_s"] for r in rows if (r["workload"], r["concurrency"]) == g and r["method"] == method), 0)
            for g in groups
        ]
        ax.bar([i + m * width for i in range(len(groups))], values, width, label=method)
    ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{w}\nconcurrency {c}" for w, c in groups])
    ax.set_ylabel("output tokens/s")
    ax.set_title("kiln speculative decoding, SmolLM2-135M-Instruct (offline engine)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
