"""Accuracy of kiln through lm-evaluation-harness 0.4.13 on the local tasks of tests/lm_eval/ (kiln_mc:
50 multiple-choice questions scored by log-likelihood; kiln_gen: 20 short answers by greedy chat generation),
next to Hugging Face transformers float32 on the same model.

    .venv/bin/python -m bench.lm_eval_accuracy

Backends: `hf` (transformers, float32, CPU), `kiln serve --dtype float32|bfloat16` (dense weights), `kiln serve`
with no flags (what this CPU gets by default: for the embedded GGUF the file's Q4_1 blocks), and kiln engines built
at the --engines precisions (default int8-wo and int4-rtn: no calibration search, about a minute each on 2
cores; built into bench/results/engines/ and reused) over HTTP (local-completions for kiln_mc,
local-chat-completions for kiln_gen). Prints a Markdown table and writes JSON and PNG to bench/results/.
Exits 1 unless float32 kiln's kiln_mc accuracy equals transformers' exactly: both compute the same float32
log-likelihoods, so any argmax flip means kiln's prompt scoring is off."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.event_loop import RESULTS, start_server, stop_server
from engines.model_source import resolve_model

REPO = Path(__file__).resolve().parents[1]

TASKS = REPO / "tests" / "lm_eval"


def evaluate(model: str, model_args: dict, task: str, chat: bool) -> tuple[float, int]:
    """(the task's score, requests answered) of one lm_eval run."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[task],
        log_samples=True,
        task_manager=TaskManager(include_path=str(TASKS)),
        apply_chat_template=chat,
    )
    metric = "acc,none" if task == "kiln_mc" else "exact_match,first_number"
    return out["results"][task][metric], sum(len(s["resps"]) for s in out["samples"][task])


def run_backend(name: str, mc_model: tuple[str, dict], gen_model: tuple[str, dict]) -> dict:
    start = time.monotonic()
    mc, mc_requests = evaluate(*mc_model, "kiln_mc", chat=False)
    # kiln_gen goes through the chat template everywhere: the instruct model answers questions as a chat
    gen, gen_requests = evaluate(*gen_model, "kiln_gen", chat=True)
    return {
        "backend": name,
        "mc_acc": mc,
        "gen_exact_match": gen,
        "requests": mc_requests + gen_requests,
        "seconds": round(time.monotonic() - start, 1),
    }


def build_engine(precision: str) -> Path:
    """An engine of the default model at `precision` (kiln build reuses an up-to-date one)."""
    out = RESULTS / "engines" / precision
    print(f"building (or reusing) the {precision} engine in {out} ...", flush=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "build",
            "--precision",
            precision,
            "--output",
            str(out),
            "--calib-samples",
            "16",
            "--eval-samples",
            "16",
            "--eval-tokens",
            "8",
            "--no-bench",
        ],
        cwd=REPO,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return out


def kiln(label: str, env: dict, folder: Path, stamp: str) -> dict:
    log_path = RESULTS / f"lm_eval_accuracy-{stamp}-kiln-{label}.log"
    process, base_url = start_server(env, log_path)  # start_server takes no CLI flags
    try:
        import httpx

        served = httpx.get(f"{base_url}/v1/models").json()["data"][0]["id"]
        # num_concurrent > 1: lm_eval's async path raises on a failed request instead of skipping it
        common = dict(model=served, num_concurrent=2, max_retries=1)
        return run_backend(
            f"kiln {label}",
            (
                "local-completions",
                common
                | dict(
                    base_url=f"{base_url}/v1/completions",
                    tokenizer=str(folder),
                    tokenizer_backend="huggingface",
                    tokenized_requests=True,
                ),
            ),
            (
                "local-chat-completions",
                common | dict(base_url=f"{base_url}/v1/chat/completions", tokenized_requests=False),
            ),
        )
    finally:
        stop_server(process)


def markdown(rows: list[dict]) -> str:
    lines = ["| backend / precision | MC acc | gen exact_match | requests | seconds |", "|---|---:|---:|---:|---:|"]
    lines += [
        f"| {r['backend']} | {r['mc_acc']:.2f} | {r['gen_exact_match']:.2f} | {r['requests']} | {r['seconds']} |"
        for r in rows
    ]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["mc_acc"] for r in rows], 0.4, label="kiln_mc acc")
    ax.bar([x + 0.2 for x in xs], [r["gen_exact_match"] for r in rows], 0.4, label="kiln_gen exact_match")
    ax.set_xticks(list(xs), [r["backend"] for r in rows])
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("lm-evaluation-harness on SmolLM2-135M-Instruct")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--engines",
        default="int8-wo,int4-rtn",
        help="precisions to build and evaluate as engines, comma-separated ('' for none)",
    )
    args = parser.parse_args()
    os.chdir(REPO)  # the task YAMLs' data_files are relative to the working directory
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = resolve_model(None)
    hf_args = dict(pretrained=str(folder), dtype="float32", device="cpu", batch_size=8)
    rows = [run_backend("transformers float32", ("hf", hf_args), ("hf", hf_args))]
    rows += [kiln(dtype, {"KILN_DTYPE": dtype}, folder, stamp) for dtype in ("float32", "bfloat16")]
    rows.append(kiln("default", {}, folder, stamp))  # no flags: --dtype and --quantization auto for this CPU
    rows += [
        kiln(f"{p} engine", {"KILN_ENGINE_DIR": str(build_engine(p))}, folder, stamp)
        for p in filter(None, args.engines.split(","))
    ]
    print(markdown(rows))
    equal = rows[1]["mc_acc"] == rows[0]["mc_acc"]
    print(
        f"float32 kiln's MC accuracy {'equals' if equal else 'DIFFERS FROM'} transformers' "
        f"({rows[1]['mc_acc']} vs {rows[0]['mc_acc']})"
    )
    out = RESULTS / f"lm_eval_accuracy-{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "model": str(folder),
                "rows": rows,
                "float32_mc_equal": equal,
            },
            indent=2,
        )
        + "\n"
    )
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
