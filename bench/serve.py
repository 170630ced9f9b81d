"""Load generator for any OpenAI-compatible server (kiln or a peer), with vLLM's serving metrics.

Sends streamed /v1/completions requests at fixed concurrency levels (a closed loop: each of C workers sends
its next request when the previous one ends) or at Poisson arrival rates (an open loop), with prompts of a
given token length cut from kiln's held-out chat texts by a local tokenizer, and a fixed output length
(`ignore_eos`; output tokens are counted from the usage chunk, or by the tokenizer where a server sends none).

Metrics follow vLLM's `benchmark_serving` definitions:
  TTFT  first streamed chunk with a choice - request sent  (per request; its text may be empty)
  TPOT  (E2E - TTFT) / (output tokens - 1)                  (per request with > 1 token)
  ITL   time between successive streamed chunks             (every gap of every request)
  E2E   last chunk - request sent                           (per request)
  request and output-token throughput over the level's wall time; goodput: requests/s meeting every SLO.

    python -m bench.serve --base-url http://127.0.0.1:8000 --concurrency 1 8 32
    python -m bench.serve --base-url http://127.0.0.1:8000 --request-rate 1 4 --goodput ttft:500 tpot:50
Prints a Markdown table and writes JSON and PNG (throughput vs load, latency percentiles) to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TEXTS = REPO / "build" / "calibration" / "eval.jsonl"
PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def default_tokenizer() -> str:
    """The default model's Hugging Face folder (converted from its GGUF by kiln, once)."""
    from engines.model_source import resolve_model

    return str(resolve_model(None))


def make_prompts(tokenizer, n: int, input_len: int, seed: int = 0) -> list[str]:
    """n prompts of exactly input_len tokens (by this tokenizer): held-out chat texts joined end to end,
    each prompt starting at a random point so no two share a prefix the server could cache."""
    texts = [m["content"] for line in TEXTS.read_text().splitlines() for m in json.loads(line)["messages"]]
    ids = tokenizer("\n\n".join(texts * 4), add_special_tokens=False)["input_ids"]
    if len(ids) < input_len + n:
        raise ValueError(f"--input-len {input_len} is longer than the prompt text ({len(ids)} tokens).")
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        start = rng.randrange(0, len(ids) - input_len)
        prompts.append(tokenizer.decode(ids[start : start + input_len]))
    return prompts


async def one_request(
    client: httpx.AsyncClient, model: str, prompt: str, output_len: int, tokenizer, extra_body: dict | None = None
) -> RequestResult:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    } | (extra_body or {})
    text, chunks, usage = [], [], None
    sent = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return RequestResult(False, error=f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                event = json.loads(line[5:])
                if event.get("usage"):
                    usage = event["usage"]
                if event.get("choices"):  # vLLM's bench: any chunk with a choice counts, its text may be empty
                    chunks.append(time.perf_counter())
                    text.append(event["choices"][0].get("text") or "")
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return RequestResult(False, error=f"{type(exc).__name__}: {exc}")
    if not chunks:
        return RequestResult(False, error="no tokens streamed")
    if usage and usage.get("completion_tokens"):
        output_tokens, prompt_tokens = usage["completion_tokens"], usage.get("prompt_tokens", 0)
    else:
        output_tokens = len(tokenizer("".join(text), add_special_tokens=False)["input_ids"])
        prompt_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return RequestResult(True, prompt_tokens, output_tokens, chunks[0] - sent, chunks[-1] - sent, list(np.diff(chunks)))


def auth(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def run_level(
    base_url: str,
    model: str,
    prompts: list[str],
    output_len: int,
    tokenizer,
    *,
    concurrency: int | None = None,
    rate: float | None = None,
    seed: int = 0,
    api_key: str | None = None,
    extra_body: dict | None = None,
) -> tuple[list, float]:
    """All prompts at one load level; returns the results and the level's wall time."""
    limits = httpx.Limits(max_connections=max(concurrency or 0, 256))
    async with httpx.AsyncClient(
        base_url=base_url, timeout=httpx.Timeout(600.0), limits=limits, headers=auth(api_key)
    ) as client:
        started = time.perf_counter()
        if concurrency is not None:
            queue = list(reversed(prompts))
            results: list[RequestResult] = []

            async def worker():
                while queue:
                    results.append(await one_request(client, model, queue.pop(), output_len, tokenizer, extra_body))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            rng = np.random.default_rng(seed)
            tasks = []
            for prompt in prompts:
                tasks.append(asyncio.create_task(one_request(client, model, prompt, output_len, tokenizer, extra_body)))
                if rate != float("inf"):
                    await asyncio.sleep(rng.exponential(1.0 / rate))
            results = list(await asyncio.gather(*tasks))
        return results, time.perf_counter() - started


def summarize(results: list[RequestResult], duration: float, goodput: dict[str, float]) -> dict:
    ok = [r for r in results if r.ok]
    out: dict = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "errors": sorted({r.error for r in results if not r.ok})[:3],
    }
    if not ok:
        return out
    output_tokens = sum(r.output_tokens for r in ok)
    out |= {
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (output_tokens + sum(r.prompt_tokens for r in ok)) / duration,
        "mean_prompt_tokens": float(np.mean([r.prompt_tokens for r in ok])),
        "mean_output_tokens": output_tokens / len(ok),
    }
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [r.tpot for r in ok if r.tpot is not None],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.e2e for r in ok],
    }
    for name, values in series.items():
        ms = np.asarray(values or [np.nan]) * 1000
        out[f"mean_{name}_ms"] = float(np.mean(ms))
        for p in PERCENTILES:
            out[f"p{p}_{name}_ms"] = float(np.percentile(ms, p))
    if goodput:

        def meets(r: RequestResult) -> bool:
            got = {"ttft": r.ttft * 1000, "tpot": (r.tpot or 0) * 1000, "e2el": r.e2e * 1000}
            return all(got[k] <= limit for k, limit in goodput.items())

        out["goodput"] = sum(meets(r) for r in ok) / duration
    return out


def parse_goodput(items: list[str]) -> dict[str, float]:
    slo = {}
    for item in items:
        name, _, value = item.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not value:
            raise SystemExit(f"serve.py: --goodput takes ttft:MS, tpot:MS or e2el:MS, got {item!r}.")
        slo[name] = float(value)
    return slo


def served_model(base_url: str, api_key: str | None = None) -> str:
    return httpx.get(f"{base_url}/v1/models", headers=auth(api_key), timeout=30).json()["data"][0]["id"]


def benchmark(
    base_url: str,
    *,
    tokenizer_path: str | None = None,
    input_len: int = 128,
    output_len: int = 128,
    concurrency: list[int] | None = None,
    request_rate: list[float] | None = None,
    num_prompts: int | None = None,
    goodput: dict[str, float] | None = None,
    label: str = "",
    warmup: int = 2,
    seed: int = 0,
    api_key: str | None = None,
    extra_body: dict | None = None,
) -> dict:
    """Run every level against one server; returns the JSON document (levels in order). extra_body is merged
    into every request (e.g. a logit_bias against EOS for a server without ignore_eos)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or default_tokenizer())
    model = served_model(base_url, api_key)
    levels = [("concurrency", c) for c in concurrency or []] + [("request_rate", r) for r in request_rate or []]
    sizes = [num_prompts or (max(8, 4 * int(v)) if k == "concurrency" else 32) for k, v in levels]
    # each level gets prompts of its own: a level reusing an earlier one's would hit the server's prefix cache
    prompts = make_prompts(tokenizer, warmup + sum(sizes), input_len, seed)
    asyncio.run(
        run_level(
            base_url,
            model,
            prompts[:warmup],
            min(output_len, 16),
            tokenizer,
            concurrency=1,
            api_key=api_key,
            extra_body=extra_body,
        )
    )
    doc = {
        "label": label or base_url,
        "base_url": base_url,
        "model": model,
        "input_len": input_len,
        "output_len": output_len,
        "goodput_slo_ms": goodput or {},
        "extra_body": extra_body or {},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "levels": [],
    }
    start = warmup
    for (kind, value), n in zip(levels, sizes):
        level_prompts, start = prompts[start : start + n], start + n
        results, duration = asyncio.run(
            run_level(
                base_url,
                model,
                level_prompts,
                output_len,
                tokenizer,
                concurrency=int(value) if kind == "concurrency" else None,
                rate=value if kind == "request_rate" else None,
                seed=seed,
                api_key=api_key,
                extra_body=extra_body,
            )
        )
        level = {"kind": kind, "value": value, "num_prompts": n} | summarize(results, duration, goodput or {})
        doc["levels"].append(level)
        print(
            f"  {doc['label']} {kind}={value}: {level.get('output_throughput', 0):.1f} tok/s, "
            f"TTFT p50 {level.get('p50_ttft_ms', float('nan')):.0f} ms, failed {level['failed']}",
            flush=True,
        )
    return doc


def markdown(docs: list[dict]) -> str:
    rows = [
        "| server | load | req/s | output tok/s | TTFT p50 / p90 / p99 ms | TPOT p50 / p90 ms | ITL p50 / p99 ms "
        "| E2E p50 / p99 s | goodput req/s | failed |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for doc in docs:
        for lv in doc["levels"]:
            load = f"c={lv['value']}" if lv["kind"] == "concurrency" else f"rate={lv['value']}/s"
            if not lv["completed"]:
                rows.append(f"| {doc['label']} | {load} | - | - | - | - | - | - | - | {lv['failed']} |")
                continue
            good = f"{lv['goodput']:.2f}" if "goodput" in lv else "-"
            rows.append(
                f"| {doc['label']} | {load} | {lv['request_throughput']:.2f} | {lv['output_throughput']:.1f} "
                f"| {lv['p50_ttft_ms']:.0f} / {lv['p90_ttft_ms']:.0f} / {lv['p99_ttft_ms']:.0f} "
                f"| {lv['p50_tpot_ms']:.1f} / {lv['p90_tpot_ms']:.1f} "
                f"| {lv['p50_itl_ms']:.1f} / {lv['p99_itl_ms']:.1f} "
                f"| {lv['p50_e2el_ms'] / 1000:.2f} / {lv['p99_e2el_ms'] / 1000:.2f} | {good} | {lv['failed']} |"
            )
    return "\n".join(rows)


def plot(docs: list[dict], path: Path) -> None:
    """Left: output tok/s against load; right: TTFT p50/p90/p99 against load (log scale), one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for doc in docs:
        levels = [lv for lv in doc["levels"] if lv["completed"]]
        for kind in ("concurrency", "request_rate"):
            sel = [lv for lv in levels if lv["kind"] == kind]
            if not sel:
                continue
            x = [lv["value"] for lv in sel]
            suffix = "" if kind == "concurrency" else " (rate)"
            (line,) = left.plot(x, [lv["output_throughput"] for lv in sel], marker="o", label=doc["label"] + suffix)
            for p, style in zip(PERCENTILES, ("-", "--", ":")):
                right.plot(
                    x,
                    [lv[f"p{p}_ttft_ms"] for lv in sel],
                    style,
                    marker="o",
                    color=line.get_color(),
                    label=f"{doc['label']}{suffix} p{p}",
                )
    left.set(xlabel="concurrency (or requests/s)", ylabel="output tokens/s", title="Throughput")
    right.set(xlabel="concurrency (or requests/s)", ylabel="TTFT ms", yscale="log", title="Time to first token")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (without /v1)")
    parser.add_argument("--label", default="", help="name of this server in the table and plots")
    parser.add_argument("--api-key", help="sent as Authorization: Bearer KEY")
    parser.add_argument("--tokenizer", help="local tokenizer folder (default: the default model's)")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens (default 128)")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens (default 128)")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[], help="closed-loop levels, e.g. 1 8 32")
    parser.add_argument(
        "--request-rate", type=float, nargs="*", default=[], help="Poisson rates in req/s (inf: all at once)"
    )
    parser.add_argument(
        "--num-prompts", type=int, help="requests per level (default 4 x concurrency, >= 8; 32 per rate)"
    )
    parser.add_argument("--goodput", nargs="*", default=[], help="SLOs in ms: ttft:MS tpot:MS e2el:MS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON path (default bench/results/serve-<label>-<time>.json, PNG beside it)")
    args = parser.parse_args()
    if not args.concurrency and not args.request_rate:
        args.concurrency = [1, 8, 32]
    if any(c < 1 for c in args.concurrency) or any(r <= 0 for r in args.request_rate):
        parser.error("concurrency levels must be >= 1 and request rates > 0")
    try:
        served_model(args.base_url, args.api_key)
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        print(f"serve.py: no OpenAI-compatible server answers at {args.base_url}/v1/models ({exc}).", file=sys.stderr)
        return 1
    doc = benchmark(
        args.base_url,
        tokenizer_path=args.tokenizer,
        input_len=args.input_len,
        output_len=args.output_len,
        concurrency=args.concurrency,
        request_rate=args.request_rate,
        num_prompts=args.num_prompts,
        goodput=parse_goodput(args.goodput),
        label=args.label,
        seed=args.seed,
        api_key=args.api_key,
    )
    print(markdown([doc]))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else RESULTS / f"serve-{(args.label or 'server').replace('/', '_')}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    plot([doc], out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
