"""The cost of structured outputs in kiln: constrained decoding (xgrammar, JSON schema) vs free text.

Over the 57 schemas of tests/structured_schemas.py:
  compile     in this process, before any server load: kiln's Grammars (the server's compiler) for the default
              model's tokenizer, built once; each schema's first compile (a cache miss) is timed.
  throughput  on one server, chat completions at concurrency 1 and 32, temperature 0: the same prompts
              ("Produce a JSON document for the schema '<name>'.", schemas round-robin in a seeded order) with
              response_format json_schema (max_tokens M) and without a constraint. A constrained output ends
              when its JSON is complete, so an untimed pass first learns each prompt's constrained length, and
              the free request of that prompt generates exactly as many tokens (max_tokens = that length,
              ignore_eos): both arms then do the same work at the same batch occupancy. An arm's tok/s is its
              usage.completion_tokens summed over its wall time. Goal: constrained / unconstrained >= 0.90 at
              each concurrency (exit status 1 if not).
  TTFT        at concurrency 1 the requests stream; time to first token is until the first chunk after the
              role-only one, with and without the schema.
Before the arms, every schema is compiled on the server by a 1-token constrained request and both arms are
warmed, so neither compile time nor first-call costs fall inside an arm. Each arm's requests are split into
--rounds rounds run in the order U C, C U, U C, ...: drift on a noisy machine then weighs on both arms alike.

    python -m bench.structured                                   # starts `kiln serve` on a free port, stops it after
    python -m bench.structured --requests-1 2 --requests-32 8 --max-tokens 32    # a quick check
    python -m bench.structured --base-url http://127.0.0.1:8000
Prints progress and Markdown tables; writes JSON and PNG (tok/s per arm, compile time per schema, TTFT) to
bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from openai import AsyncOpenAI

from bench.event_loop import RESULTS, cpu_model, start_server, stop_server
from tests.structured_schemas import SCHEMAS

REQUEST_TIMEOUT_S = 600
GOAL_RATIO = 0.90
WARMUP_CONCURRENCY = 8
WARMUP_REQUESTS = 4  # full-length requests per arm after the compiles
# compiled untimed first, so that xgrammar's one-off initialisation is not charged to the first schema
WARMUP_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}


# ---- compile time, in process ---------------------------------------------------------------------
def compile_times() -> dict:
    from engines.base import StructuredOutput
    from engines.config import EngineConfig
    from engines.torch.grammar import Grammars
    from engines.torch.loader import load_model

    loaded = load_model(EngineConfig())
    t0 = time.perf_counter()
    grammars = Grammars(loaded.tokenizer, loaded.model.args.vocab_size, [loaded.tokenizer.eos_token_id])
    construct_ms = (time.perf_counter() - t0) * 1000
    del loaded  # only the tokenizer's vocabulary was needed; the weights would sit in memory during the load
    t0 = time.perf_counter()
    grammars.compile(StructuredOutput("json", json.dumps(WARMUP_SCHEMA)))
    warmup_ms = (time.perf_counter() - t0) * 1000
    per_schema = []
    for name, schema in SCHEMAS:  # all distinct, so every compile is a cache miss
        t0 = time.perf_counter()
        grammars.compile(StructuredOutput("json", json.dumps(schema)))
        per_schema.append({"schema": name, "ms": (time.perf_counter() - t0) * 1000})
    ms = np.array([r["ms"] for r in per_schema])
    return {
        "construct_ms": construct_ms,
        "warmup_compile_ms": warmup_ms,
        "per_schema": per_schema,
        "median_ms": float(np.median(ms)),
        "p90_ms": float(np.percentile(ms, 90)),
        "max_ms": float(ms.max()),
        "total_ms": float(ms.sum()),
    }


# ---- requests ---------------------------------------------------------------------------------------
def request_args(model: str, name: str, schema: dict, constrained: bool, max_tokens: int) -> dict:
    """A constrained request stops where its JSON is complete; a free one generates exactly max_tokens."""
    args = {
        "model": model,
        "temperature": 0,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": f"Produce a JSON document for the schema '{name}'."}],
    }
    if constrained:
        args["response_format"] = {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
    else:
        args["extra_body"] = {"ignore_eos": True}
    return args


def is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


async def one(client: AsyncOpenAI, args: dict, stream: bool) -> dict:
    """A request's completion tokens, finish reason, whether its text is JSON, seconds and (streamed) TTFT."""
    t0 = time.perf_counter()
    if not stream:
        response = await client.chat.completions.create(**args)
        choice = response.choices[0]
        return {
            "tokens": response.usage.completion_tokens,
            "finish": choice.finish_reason,
            "json": is_json(choice.message.content or ""),
            "seconds": time.perf_counter() - t0,
            "ttft_s": None,
        }
    ttft, text, finish, tokens = None, [], None, 0
    async for chunk in await client.chat.completions.create(
        **args, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            # the role-only chunk goes out before anything is generated; the next one carries the first token
            if choice.delta.role is None and ttft is None:
                ttft = time.perf_counter() - t0
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return {
        "tokens": tokens,
        "finish": finish,
        "json": is_json("".join(text)),
        "seconds": time.perf_counter() - t0,
        "ttft_s": ttft,
    }


async def run_all(client: AsyncOpenAI, requests: list[dict], concurrency: int, stream: bool) -> tuple[list, float]:
    """The results of `requests` sent `concurrency` at a time, and the wall time of the whole set."""
    gate = asyncio.Semaphore(concurrency)

    async def gated(args: dict) -> dict:
        async with gate:
            return await one(client, args, stream)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(gated(args) for args in requests))
    return list(results), time.perf_counter() - t0


# ---- the server arms ----------------------------------------------------------------------------------
def arm_summary(rounds: list[dict]) -> dict:
    results = [r for rnd in rounds for r in rnd["results"]]
    tokens, wall = sum(r["tokens"] for r in results), sum(rnd["wall_s"] for rnd in rounds)
    ttft = [r["ttft_s"] * 1000 for r in results if r["ttft_s"] is not None]
    # streamed requests: the decode rate after the first token, free of per-request overhead and prefill
    decode = [
        (r["tokens"] - 1) / (r["seconds"] - r["ttft_s"]) for r in results if r["ttft_s"] is not None and r["tokens"] > 1
    ]
    return {
        "requests": len(results),
        "tokens": tokens,
        "wall_s": wall,
        "tok_per_s": tokens / wall,
        "tokens_per_request": tokens / len(results),
        "finish": dict(Counter(r["finish"] for r in results)),
        "valid_json": sum(r["json"] for r in results),
        "ttft_ms": {
            "median": float(np.median(ttft)),
            "p90": float(np.percentile(ttft, 90)),
            "max": float(max(ttft)),
            "values": ttft,
        }
        if ttft
        else None,
        "decode_tok_per_s_median": float(np.median(decode)) if decode else None,
        "rounds": rounds,
    }


async def serve_bench(base_url: str, api_key: str | None, args) -> dict:
    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key=api_key or "none", max_retries=0, timeout=REQUEST_TIMEOUT_S)
    async with client:
        model = (await client.models.list()).data[0].id
        order = list(SCHEMAS)
        random.Random(args.seed).shuffle(order)  # short runs would otherwise see only the simplest schemas

        def picks(start: int, count: int) -> list[tuple[str, dict]]:
            return [order[(start + i) % len(order)] for i in range(count)]

        print(
            f"warm-up: compiling {len(SCHEMAS)} schemas on the server, then {WARMUP_REQUESTS} requests per arm",
            flush=True,
        )
        t0 = time.perf_counter()
        # also sends every prompt once, so that both arms find them in the prefix cache alike
        await run_all(client, [request_args(model, n, s, True, 1) for n, s in SCHEMAS], WARMUP_CONCURRENCY, False)
        for constrained in (False, True):
            await run_all(
                client,
                [request_args(model, n, s, constrained, args.max_tokens) for n, s in picks(0, WARMUP_REQUESTS)],
                WARMUP_REQUESTS,
                False,
            )
        print(f"  done in {time.perf_counter() - t0:.1f} s", flush=True)

        levels = []
        for concurrency, count, start in ((1, args.requests_1, 0), (32, args.requests_32, args.requests_1)):
            chosen = picks(start, count)
            stream = concurrency == 1  # TTFT is measured at concurrency 1; 32 parsed streams would tax the CPU
            probe, _ = await run_all(
                client, [request_args(model, n, s, True, args.max_tokens) for n, s in chosen], 32, False
            )
            lengths = [max(1, r["tokens"]) for r in probe]
            rounds = {False: [], True: []}
            for rnd in range(args.rounds):
                part = list(zip(chosen, lengths))[rnd :: args.rounds]
                for constrained in (False, True) if rnd % 2 == 0 else (True, False):
                    results, wall = await run_all(
                        client,
                        [
                            request_args(model, n, s, constrained, args.max_tokens if constrained else length)
                            for (n, s), length in part
                        ],
                        concurrency,
                        stream,
                    )
                    rounds[constrained].append({"wall_s": wall, "results": results})
                    tokens = sum(r["tokens"] for r in results)
                    print(
                        f"  concurrency {concurrency}, round {rnd + 1}/{args.rounds}, "
                        f"{'constrained' if constrained else 'unconstrained'}: {len(results)} requests, "
                        f"{tokens} tokens in {wall:.1f} s = {tokens / wall:.1f} tok/s",
                        flush=True,
                    )
            free, constrained = arm_summary(rounds[False]), arm_summary(rounds[True])
            ratio = constrained["tok_per_s"] / free["tok_per_s"]
            levels.append(
                {
                    "concurrency": concurrency,
                    "unconstrained": free,
                    "constrained": constrained,
                    "ratio": ratio,
                    "goal_met": bool(ratio >= GOAL_RATIO),
                }
            )
    return {"model": model, "levels": levels}


# ---- report ---------------------------------------------------------------------------------------------
def markdown(doc: dict) -> str:
    lines = [
        "| concurrency | arm | requests | tokens | tokens/request | wall s | tok/s | decode tok/s (median) "
        "| TTFT ms median / p90 | finish | valid JSON | constrained / unconstrained |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|---|---:|---|",
    ]
    for level in doc["levels"]:
        for arm in ("unconstrained", "constrained"):
            a = level[arm]
            ttft = f"{a['ttft_ms']['median']:.0f} / {a['ttft_ms']['p90']:.0f}" if a["ttft_ms"] else "-"
            decode = f"{a['decode_tok_per_s_median']:.1f}" if a["decode_tok_per_s_median"] else "-"
            finish = ", ".join(f"{k} {v}" for k, v in a["finish"].items())
            verdict = (
                f"{level['ratio']:.2f} (goal >= {GOAL_RATIO:.2f}: {'PASS' if level['goal_met'] else 'FAIL'})"
                if arm == "constrained"
                else ""
            )
            lines.append(
                f"| {level['concurrency']} | {arm} | {a['requests']} | {a['tokens']} | "
                f"{a['tokens_per_request']:.1f} | {a['wall_s']:.1f} | {a['tok_per_s']:.1f} | {decode} | "
                f"{ttft} | {finish} | {a['valid_json']}/{a['requests']} | {verdict} |"
            )
    c = doc["compile"]
    lines += [
        "",
        "| xgrammar compile, first per schema | ms |",
        "|---|---:|",
        f"| median | {c['median_ms']:.1f} |",
        f"| p90 | {c['p90_ms']:.1f} |",
        f"| max | {c['max_ms']:.1f} |",
        f"| total, {len(c['per_schema'])} schemas | {c['total_ms']:.1f} |",
        f"| Grammars() once (tokenizer info) | {c['construct_ms']:.1f} |",
    ]
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    """Left: tok/s per arm and concurrency with the ratio; middle: compile ms per schema; right: TTFT at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [2, 3, 2]})
    levels = doc["levels"]
    x = np.arange(len(levels))
    for k, arm in enumerate(("unconstrained", "constrained")):
        left.bar(x + (k - 0.5) * 0.4, [lv[arm]["tok_per_s"] for lv in levels], 0.4, label=arm, color=f"C{k}")
    for i, lv in enumerate(levels):
        top = max(lv["unconstrained"]["tok_per_s"], lv["constrained"]["tok_per_s"])
        left.annotate(f"x{lv['ratio']:.2f}", (i, top), ha="center", va="bottom", color="C2" if lv["goal_met"] else "C3")
    left.margins(y=0.12)  # room for the ratios above the bars
    left.set(
        xticks=x,
        xticklabels=[f"concurrency {lv['concurrency']}" for lv in levels],
        ylabel="output tok/s",
        title=f"Throughput (goal: constrained >= {GOAL_RATIO:.2f} x)",
    )
    left.legend(fontsize=8)
    per_schema = doc["compile"]["per_schema"]
    middle.bar(range(len(per_schema)), [r["ms"] for r in per_schema])
    middle.axhline(doc["compile"]["median_ms"], color="C1", linestyle="--", linewidth=1, label="median")
    middle.set(xticks=range(len(per_schema)), ylabel="ms", title="xgrammar compile per schema (first, uncached)")
    middle.set_xticklabels([r["schema"] for r in per_schema], rotation=90, fontsize=6)
    middle.legend(fontsize=8)
    first = levels[0]
    ttfts = [
        first[arm]["ttft_ms"]["values"] if first[arm]["ttft_ms"] else [] for arm in ("unconstrained", "constrained")
    ]
    right.boxplot(ttfts, showfliers=False)
    for k, values in enumerate(ttfts):
        right.plot(np.full(len(values), k + 1.0), values, ".", color=f"C{k}")
    right.set_xticks([1, 2], ["unconstrained", "constrained"])
    right.set(ylabel="ms", title=f"Time to first token, concurrency {first['concurrency']}")
    for ax in (left, middle, right):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", help="a running server (without /v1); default: start `kiln serve` here")
    parser.add_argument("--api-key", help="sent as Authorization: Bearer KEY")
    parser.add_argument("--requests-1", type=int, default=8, help="requests per arm at concurrency 1 (default 8)")
    parser.add_argument("--requests-32", type=int, default=64, help="requests per arm at concurrency 32 (default 64)")
    parser.add_argument("--max-tokens", type=int, default=200, help="max_tokens of every request (default 200)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds each arm's requests are split into (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="order in which the schemas are used")
    args = parser.parse_args()
    if args.rounds < 1 or min(args.requests_1, args.requests_32) < args.rounds or args.max_tokens < 1:
        parser.error("--rounds and --max-tokens must be >= 1, and each --requests-* at least --rounds")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    print(
        f"# kiln structured outputs: {len(SCHEMAS)} schemas, max_tokens {args.max_tokens}, CPU {cpu_model()}",
        flush=True,
    )
    # before the server starts, so that nothing else competes for the cores
    print("compiling every schema in process ...", flush=True)
    compiled = compile_times()
    print(
        f"  {len(SCHEMAS)} schemas in {compiled['total_ms']:.0f} ms, median {compiled['median_ms']:.1f} ms", flush=True
    )
    process = None
    base_url = args.base_url
    if not base_url:
        log_path = RESULTS / f"structured-{stamp}-server.log"
        print(f"starting kiln serve (log: {log_path}) ...", flush=True)
        process, base_url = start_server({}, log_path)
    print(f"server {base_url}", flush=True)
    try:
        served = asyncio.run(serve_bench(base_url, args.api_key, args))
    finally:
        if process:
            print(f"kiln serve exited with {stop_server(process)} after SIGTERM", flush=True)
    doc = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "base_url": base_url,
        "started_server": process is not None,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "seed": args.seed,
        "goal_ratio": GOAL_RATIO,
        **served,
        "compile": compiled,
    }
    print()
    print(markdown(doc))
    out = RESULTS / f"structured-{stamp}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0 if all(level["goal_met"] for level in doc["levels"]) else 1


if __name__ == "__main__":
    sys.exit(main())
