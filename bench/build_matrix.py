"""Build the default model at every precision (and the KV-cache dtypes) and compare the build reports.

Each row is a real `kiln build` into bench/results/engines/<name> with the default calibration set
(512 requests) and the held-out evaluation set (128 prompts x 32 answer tokens); accuracy is
against the unquantized float32 model, decode tok/s is measured by each build at concurrency 1 and
32. Prints the Markdown table, writes bench/results/build_matrix.{json,md,png}. Run it alone on the
machine: the speeds are only comparable when nothing else competes for the cores.

    .venv/bin/python -m bench.build_matrix                         # the full matrix (~30-60 min on 2 cores)
    .venv/bin/python -m bench.build_matrix --rows int8-wo:int8 int4-awq:model --eval-samples 32
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from engines.build.builder import BuildOptions, build
from engines.build.report import markdown_table, report_row

RESULTS = Path(__file__).parent / "results"
DEFAULT_ROWS = [
    "fp32:model",
    "bf16:model",
    "bf16:int8",
    "bf16:fp8",
    "fp8:fp8",
    "int8-wo:model",
    "int8-wo:int8",
    "int8-sq:int8",
    "int4-rtn:int8",
    "int4-awq:int8",
    "int4-gptq:int8",
    "int4-awq:model",
]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['precision']}\nKV {r['kv_cache_dtype']}" for r in rows]
    kl = [r["accuracy"]["kl_mean"] for r in rows]
    axes[0].bar(labels, kl, color="tab:red")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("mean KL vs float32 (nats, log)")
    axes[0].set_title("accuracy loss on the held-out set")
    for c, color in ((1, "tab:blue"), (32, "tab:green")):
        speeds = [next((s["decode_tok_s"] for s in r["speed"] if s["concurrency"] == c), 0) or 0 for r in rows]
        axes[1].plot(labels, speeds, marker="o", color=color, label=f"concurrency {c}")
    axes[1].set_ylabel("decode tok/s")
    axes[1].set_title("decode speed (this machine)")
    axes[1].legend()
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7, rotation=60)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, help="precision:kv pairs")
    parser.add_argument("--eval-samples", type=int, default=128)
    parser.add_argument("--calib-samples", type=int, default=512)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    reports = []
    for row in args.rows:
        precision, kv = row.split(":")
        out = RESULTS / "engines" / f"{precision}-kv-{kv}"
        result = build(
            BuildOptions(
                output=str(out),
                precision=precision,
                kv_cache_dtype=kv,
                calib_samples=args.calib_samples,
                eval_samples=args.eval_samples,
            )
        )
        report = json.loads((out / "build-report.json").read_text())
        reports.append(report)
        print(markdown_table([report_row(report)]) + ("  (reused)" if result.reused else ""), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    table = markdown_table([report_row(r) for r in reports])
    hardware = reports[0]["hardware"]
    text = (
        f"Default model (SmolLM2-135M-Instruct) on {hardware}; accuracy vs float32 on "
        f"{reports[0]['accuracy']['prompts']} held-out prompts.\n\n{table}\n"
    )
    (RESULTS / "build_matrix.md").write_text(text)
    (RESULTS / "build_matrix.json").write_text(json.dumps(reports, indent=2))
    plot(reports, RESULTS / "build_matrix.png")
    print("\n" + text)


if __name__ == "__main__":
    main()
