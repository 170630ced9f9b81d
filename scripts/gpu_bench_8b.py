"""Decode speed of kiln's torch engine on a Llama-3-8B-shaped model, bf16 vs FP8 weights: one Markdown table.

    python -m scripts.gpu_bench_8b                   # on a CUDA GPU (defaults: Llama-3-8B shapes, H200 peak)
    python -m scripts.gpu_bench_8b --device cpu --layers 2 --hidden 256 --intermediate 512 --vocab 1000 \\
        --heads 4 --kv-heads 2                       # dry run on a CPU

Weights are random (nothing is saved or loaded) and created on the device, then go through the code an
engine directory goes through: engines.build.quantize.quantize_model (what `kiln build` runs: "bf16" keeps
the projections dense, "fp8" quantizes each per output channel to E4M3 and keeps the LM head dense),
models.llama.assemble (DenseLinear / Fp8Linear), loader.build_core (KV cache, scheduler, runner) and
LLMEngine.step. Each batch size gets `batch` random prompts, greedy, EOS ignored; after the prefill and
--warmup decode steps, --steps decode steps are timed.

Achieved bandwidth counts the bytes a decode step must read at least: every projection and LM head weight
once (not the embedding table, of which a step reads a row per token) plus each sequence's KV cache up to
its position (the mean over the timed steps), divided by the step time. The runner's real traffic is
higher (its attention gathers the KV into float32 copies), so the fraction of --peak-gbs is a lower bound
of how busy the memory was and an upper bound of kiln's distance from the bandwidth roofline.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

from engines.base import GenerationRequest, SamplingParams
from engines.build.quantize import quantize_model
from engines.config import EngineConfig
from engines.torch.loader import LoadedModel, build_core
from engines.torch.model_runner import KVCache
from engines.torch.models.llama import LlamaArgs
from engines.torch.models.registry import architecture

LLAMA = architecture("llama")

DTYPE = torch.bfloat16  # the model's (activation) dtype in both precisions
INIT_STD = 0.02  # Llama's initializer_range


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--precisions", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--steps", type=int, default=128, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=4, help="decode steps run before timing")
    p.add_argument("--peak-gbs", type=float, default=4800.0, help="memory bandwidth peak, GB/s (H200: 4800)")
    return p.parse_args()


def model_args(a: argparse.Namespace) -> tuple[LlamaArgs, object]:
    """kiln's LlamaArgs from a Hugging Face LlamaConfig, as the loader derives them (no weights allocated)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )
    return LLAMA.args_from_config(config), config


def random_tensors(args: LlamaArgs, device: torch.device) -> dict[str, torch.Tensor]:
    """Float weights under kiln's names (as read_hf_checkpoint returns them), made on the device in bf16:
    quantize_model widens one layer at a time, so fp32 copies of all 8B weights never exist at once."""
    gen = torch.Generator(device).manual_seed(0)  # the same model for every precision

    def normal(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=DTYPE, device=device).normal_(0.0, INIT_STD, generator=gen)

    h, kv = args.hidden_size, args.num_kv_heads * args.head_dim
    out = {
        "embed_tokens.weight": normal(args.vocab_size, h),
        "lm_head.weight": normal(args.vocab_size, h),
        "norm.weight": torch.ones(h, dtype=DTYPE, device=device),
    }
    for i in range(args.num_layers):
        p = f"layers.{i}."
        out[p + "input_norm.weight"] = torch.ones(h, dtype=DTYPE, device=device)
        out[p + "post_norm.weight"] = torch.ones(h, dtype=DTYPE, device=device)
        out[p + "qkv_proj.weight"] = normal(args.num_heads * args.head_dim + 2 * kv, h)
        out[p + "o_proj.weight"] = normal(h, args.num_heads * args.head_dim)
        out[p + "gate_up_proj.weight"] = normal(2 * args.intermediate_size, h)
        out[p + "down_proj.weight"] = normal(h, args.intermediate_size)
    return out


def build_model(precision: str, args: LlamaArgs, device: torch.device):
    tensors = random_tensors(args, device)
    q = quantize_model(tensors, args, precision, stats=None, progress=False)
    del tensors
    return LLAMA.assemble(args, q.tensors, q.formats, DTYPE, device)


def weight_bytes(model) -> int:
    """Bytes of every projection and the LM head (DenseLinear / Fp8Linear report their own)."""
    return (
        sum(getattr(layer, kind).weight_bytes for layer in model.layers for kind in LLAMA.projections)
        + model.lm_head.weight_bytes
    )


def time_decode(loaded: LoadedModel, a: argparse.Namespace, batch: int) -> float:
    """Seconds for a.steps decode steps of `batch` sequences, after their prefill and a.warmup steps."""
    args = loaded.model.args
    block = 16
    total = a.prompt + 1 + a.warmup + a.steps  # 1: the token the prefill step samples
    per_block = KVCache.bytes_per_block(args.num_layers, block, args.num_kv_heads, args.head_dim, DTYPE)
    config = EngineConfig(
        block_size=block,
        kv_cache_memory=per_block * batch * -(-total // block),
        max_num_seqs=batch,
        max_num_batched_tokens=batch * a.prompt,
        enable_prefix_caching=False,
    )
    core = build_core(config, loaded)
    gen = torch.Generator().manual_seed(batch)
    for i in range(batch):
        prompt = torch.randint(args.vocab_size, (a.prompt,), generator=gen).tolist()
        core.add_request(
            GenerationRequest(
                str(i), prompt, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=total - a.prompt)
            )
        )
    while core.generation_tokens_total < batch:  # prefill (one step unless the scheduler chunks it)
        core.step()
    for _ in range(a.warmup):
        core.step()
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)
    sync()
    start, before = time.perf_counter(), core.generation_tokens_total
    for _ in range(a.steps):
        core.step()
    sync()
    elapsed = time.perf_counter() - start
    # every timed step decoded every sequence (no preemption, none finished early)
    assert core.generation_tokens_total - before == batch * a.steps and not core.has_work()
    return elapsed


def main() -> int:
    a = parse_args()
    device = torch.device(a.device)
    args, hf_config = model_args(a)
    kv_per_token = KVCache.bytes_per_block(args.num_layers, 1, args.num_kv_heads, args.head_dim, DTYPE)
    rows = []
    for precision in a.precisions:
        t0 = time.perf_counter()
        model = build_model(precision, args, device)
        loaded = LoadedModel(model, hf_config, None, f"random-{precision}", Path("."), DTYPE, device)
        wbytes = weight_bytes(model)
        print(
            f"{precision}: built in {time.perf_counter() - t0:.1f} s, {wbytes / 1e9:.3f} GB of weights", file=sys.stderr
        )
        for batch in a.batches:
            elapsed = time_decode(loaded, a, batch)
            step = elapsed / a.steps
            mean_ctx = a.prompt + a.warmup + (a.steps + 1) / 2  # tokens each sequence attends to, on average
            gbs = (wbytes + batch * mean_ctx * kv_per_token) / step / 1e9
            rows.append(
                (precision, batch, batch * a.steps / elapsed, step * 1e3, wbytes / 1e9, gbs, 100 * gbs / a.peak_gbs)
            )
            print(f"{precision} batch {batch}: {step * 1e3:.2f} ms per step", file=sys.stderr)
        del model, loaded
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"\n{name}; hidden {a.hidden}, {a.layers} layers, {a.heads}/{a.kv_heads} heads, intermediate "
        f"{a.intermediate}, vocab {a.vocab}; prompt {a.prompt}, {a.steps} timed decode steps\n"
    )
    print(f"| precision | batch | decode tok/s | ms per step | weight GB | achieved GB/s | % of {a.peak_gbs:g} GB/s |")
    print("|---|---|---|---|---|---|---|")
    for precision, batch, tok_s, ms, wgb, gbs, pct in rows:
        print(f"| {precision} | {batch} | {tok_s:.1f} | {ms:.3f} | {wgb:.4g} | {gbs:.4g} | {pct:.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
