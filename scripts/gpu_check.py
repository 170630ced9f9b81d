"""One prepared device check: build FP8, INT8 (SmoothQuant) and INT4 (AWQ) engines of a Llama-shaped
random model on the GPU, check each against float32 and time decode, print one table.

    .venv/bin/python -m scripts.gpu_check                      # on a CUDA machine (the point of it)
    .venv/bin/python -m scripts.gpu_check --device cpu --hidden 256 --layers 2   # dry run on a CPU

The model is random (Llama architecture, GQA, the default model's tokenizer), so accuracy figures
only say the quantized paths compute what float does; the KL bound checked is loose on purpose.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from engines.build.builder import BuildError, BuildOptions, build
from engines.model_source import resolve_model

PRECISIONS = [("bf16", "model"), ("fp8", "fp8"), ("int8-sq", "int8"), ("int4-awq", "int8")]
MAX_KL = 0.5  # random weights make peaked but fragile distributions; a broken path gives KL >> 1


def make_model(folder: Path, hidden: int, layers: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(hidden // 128, 2)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=int(hidden * 3.5) // 128 * 128,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // 4, 1),
        max_position_embeddings=4096,
        initializer_range=0.02,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    default = resolve_model(None)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (default / name).is_file():
            shutil.copy(default / name, folder / name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--hidden", type=int, default=4096)  # Llama-8B's width
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-gpu-check-"))
    make_model(work / "model", args.hidden, args.layers)
    rows, failed = [], False
    for precision, kv in PRECISIONS:
        try:
            result = build(
                BuildOptions(
                    model=str(work / "model"),
                    output=str(work / precision),
                    precision=precision,
                    kv_cache_dtype=kv,
                    calib_samples=64,
                    eval_samples=16,
                    eval_tokens=16,
                    device=args.device,
                    progress=False,
                )
            )
        except BuildError as exc:  # e.g. FP8 on a GPU before SM 89: the documented refusal
            rows.append((precision, kv, "refused", str(exc), "", ""))
            continue
        r = json.loads((result.output / "build-report.json").read_text())
        speed = {s["concurrency"]: s["decode_tok_s"] for s in r["speed"]}
        ok = r["accuracy"]["kl_mean"] <= MAX_KL
        failed |= not ok
        rows.append(
            (
                precision,
                kv,
                "ok" if ok else "FAIL",
                f"{r['accuracy']['kl_mean']:.4f}",
                f"{100 * r['accuracy']['top1_agreement']:.1f}",
                f"{speed.get(1)} / {speed.get(32)}",
            )
        )
    print(
        f"\n{torch.cuda.get_device_name(0) if args.device == 'cuda' else 'cpu'}; hidden {args.hidden}, "
        f"{args.layers} layers\n"
    )
    print("| precision | KV | check | mean KL | top-1 % | decode tok/s c=1 / c=32 |\n|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
