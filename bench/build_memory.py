"""Peak resident memory of `kiln build` against model depth: the same width at several depths, random float32 weights
saved as safetensors (a Llama with the default model's tokenizer and tied embeddings), each built by `kiln build` in
its own process, whose peak RSS (ru_maxrss from os.wait4) is recorded.

A build that streams the checkpoint a layer at a time peaks at about the same RSS at every depth; one that loads
the float model grows by a layer's float32 bytes per layer.

    python -m bench.build_memory                        # depths 8 and 32, hidden 1024, intermediate 2816, int8-sq
    python -m bench.build_memory --repo /path/to/other/kiln/checkout   # the same with another checkout's kiln
Prints a Markdown table; writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MIB = 1 << 20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def write_random_llama(folder: Path, layers: int, hidden: int, intermediate: int, heads: int = 16) -> int:
    """A random float32 Llama checkpoint (one safetensors shard per 4 layers, written shard by shard); returns its
    weight bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from engines.model_source import resolve_model

    folder.mkdir(parents=True, exist_ok=True)
    default = resolve_model(None)
    config = LlamaConfig(
        vocab_size=49152,  # the default tokenizer's
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    config.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (default / name).is_file():
            (folder / name).write_bytes((default / name).read_bytes())
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    total = 0
    outer = {"model.embed_tokens.weight": rand(49152, hidden), "model.norm.weight": torch.ones(hidden)}
    save_file(outer, folder / "model-outer.safetensors")
    total += sum(t.numel() * 4 for t in outer.values())
    for first in range(0, layers, 4):
        shard = {}
        for i in range(first, min(first + 4, layers)):
            p = f"model.layers.{i}."
            shard |= {
                p + "input_layernorm.weight": torch.ones(hidden),
                p + "post_attention_layernorm.weight": torch.ones(hidden),
                **{p + f"self_attn.{n}_proj.weight": rand(hidden, hidden) for n in "qkvo"},
                p + "mlp.gate_proj.weight": rand(intermediate, hidden),
                p + "mlp.up_proj.weight": rand(intermediate, hidden),
                p + "mlp.down_proj.weight": rand(hidden, intermediate),
            }
        save_file(shard, folder / f"model-{first:05d}.safetensors")
        total += sum(t.numel() * 4 for t in shard.values())
    return total


def write_short_prompts(folder: Path) -> None:
    """A calibration set of 16 one-line prompts and an evaluation set of 2 (KILN_CALIBRATION_DIR's layout): the
    activations stay small beside the weights, and the builds quick."""
    folder.mkdir(parents=True, exist_ok=True)
    topics = ["rivers", "bread", "stars", "trains", "bees", "glass", "maps", "tides", "salt", "wool", "clocks", "ink"]
    topics += ["bridges", "moss", "kites", "rain"]
    calib = [{"prompt": f"Write one sentence about {topic}."} for topic in topics]
    (folder / "calib.jsonl").write_text("".join(json.dumps(r) + "\n" for r in calib))
    evaluation = [{"prompt": "Name three colours."}, {"prompt": "Count to five."}]
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evaluation))


def build_peak_rss(repo: Path, model: Path, output: Path, precision: str, work: Path) -> int:
    """Peak RSS in bytes of one `kiln build` (repo's code) in a process of its own, with the short prompts of
    write_short_prompts (in `work`, with the build's cache) and no speed measurement."""
    write_short_prompts(work / "prompts")
    argv = ["build", "--model", str(model), "--output", str(output), "--precision", precision]
    argv += ["--kv-cache-dtype", "model", "--calib-samples", "16", "--eval-samples", "2", "--eval-tokens", "4"]
    argv += ["--no-bench", "--force"]
    code = "import sys; from server.cli import main; sys.exit(main(sys.argv[1:]))"
    env = os.environ | {"PYTHONPATH": str(repo), "KILN_CACHE_DIR": str(work / "cache")}
    env |= {"KILN_CALIBRATION_DIR": str(work / "prompts"), "TQDM_DISABLE": "1"}
    # A process's ru_maxrss keeps the high-water mark of the address space it exec'ed from (Linux records the old
    # mm's peak at exec, and a vfork child execs from its parent's), so the build is started by a small launcher,
    # not by this process, which has written the model, and the launcher reports the build's own peak.
    done = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, sys.executable, "-c", code, *argv],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"kiln build of {model} failed (exit status {done.returncode})")
    return int(done.stdout.split()[-1]) * 1024  # kilobytes on Linux


_LAUNCHER = """import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measure(repo: Path, depths: list[int], hidden: int, intermediate: int, precision: str) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="kiln-build-memory-") as tmp:
        for depth in depths:
            model = Path(tmp) / f"model-{depth}"
            weight_bytes = write_random_llama(model, depth, hidden, intermediate)
            peak = build_peak_rss(repo, model, Path(tmp) / f"engine-{depth}", precision, Path(tmp))
            row = {"depth": depth, "peak_rss_mib": round(peak / MIB), "model_fp32_mib": round(weight_bytes / MIB)}
            rows.append(row)
            print(f"depth {depth}: peak RSS {peak / MIB:.0f} MiB (model float32 {weight_bytes / MIB:.0f} MiB)")
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| depth | peak RSS MiB | model float32 MiB |", "|---:|---:|---:|"]
    lines += [f"| {r['depth']} | {r['peak_rss_mib']} | {r['model_fp32_mib']} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO, help="the kiln checkout whose build is measured")
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--precision", default="int8-sq")
    args = parser.parse_args()
    rows = measure(args.repo.resolve(), args.depths, args.hidden, args.intermediate, args.precision)
    print(table(rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"build_memory-{stamp}.json"
    meta = {"repo": str(args.repo), "hidden": args.hidden, "intermediate": args.intermediate}
    path.write_text(json.dumps({**meta, "precision": args.precision, "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
