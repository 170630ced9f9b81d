"""How fast GET /metrics answers while streams are generating.

The Gateway API Inference Extension's endpoint picker scrapes every model server's /metrics about every 50 ms
and treats metrics older than about 200 ms as stale, so a scrape that waits on a busy server takes the replica
out of its picks. This script scrapes every 50 ms from a process of its own (a ticker, like the picker: a slow
scrape delays the next one, it does not pile up), while a closed loop of streaming chat requests keeps
`concurrency` of them in flight (each one sent as soon as the last one ended), at concurrency 0, 8, 16 and 32.

    python -m bench.metrics_latency                      # starts `kiln serve` (default model), stops it after
    python -m bench.metrics_latency --seconds 60 --levels 32
    python -m bench.metrics_latency --base-url http://127.0.0.1:8000

Prints a Markdown table (scrapes, p50/p90/p99/max ms per level) and writes JSON and a PNG to bench/results/.
The goal: p99 < 50 ms and max < 200 ms at concurrency 32.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

from bench.event_loop import RESULTS, auth, cpu_model, start_server, stop_server

SCRAPE_INTERVAL_S = 0.05
SCRAPE_TIMEOUT_S = 10.0
WARMUP_S = 2.0  # the load ramps up (prefills of the first requests) before scrapes are counted
GOAL_P99_MS = 50.0
GOAL_MAX_MS = 200.0
MAX_TOKENS = 64


def scraper(base_url: str, stop, conn) -> None:
    """In its own process, so that the load generator cannot delay it: (sent at, seconds, ok) per scrape."""
    samples = []
    with httpx.Client(base_url=base_url, timeout=SCRAPE_TIMEOUT_S) as client:
        next_at = time.monotonic()
        while not stop.is_set():
            sent = time.monotonic()
            try:
                response = client.get("/metrics")
                ok = response.status_code == 200 and b"kiln:num_requests_running" in response.content
            except httpx.HTTPError:
                ok = False
            samples.append((sent, time.monotonic() - sent, ok))
            next_at = max(next_at + SCRAPE_INTERVAL_S, time.monotonic())
            stop.wait(next_at - time.monotonic())
    conn.send(samples)


async def closed_loop(base_url: str, headers: dict, concurrency: int, seconds: float) -> dict:
    """`concurrency` workers, each sending streaming chat requests one after another for `seconds`."""
    deadline = time.monotonic() + seconds
    done = {"requests": 0, "failed": 0, "tokens": 0}

    async def worker(client: httpx.AsyncClient, w: int) -> None:
        i = 0
        while time.monotonic() < deadline:
            body = {
                "messages": [{"role": "user", "content": f"Tell me about lighthouse {w}-{i}."}],
                "max_tokens": MAX_TOKENS,
                "ignore_eos": True,
                "stream": True,
            }
            i += 1
            try:
                async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    chunks = [line async for line in response.aiter_lines() if line.startswith("data: {")]
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok, chunks = False, []
            done["requests"] += ok
            done["failed"] += not ok
            done["tokens"] += len(chunks)

    limits = httpx.Limits(max_connections=max(concurrency, 1))
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=600, limits=limits) as client:
        await asyncio.gather(*(worker(client, w) for w in range(concurrency)))
    return done


def measure(base_url: str, headers: dict, concurrency: int, seconds: float) -> dict:
    stop = mp.Event()
    receiver, sender = mp.Pipe(duplex=False)
    process = mp.Process(target=scraper, args=(base_url, stop, sender))
    started = time.monotonic()
    process.start()
    if concurrency:
        load = asyncio.run(closed_loop(base_url, headers, concurrency, seconds))
    else:
        time.sleep(seconds)
        load = {"requests": 0, "failed": 0, "tokens": 0}
    ended = time.monotonic()
    stop.set()
    samples = receiver.recv()
    process.join()
    counted = [(sent - started, lat, ok) for sent, lat, ok in samples if started + WARMUP_S <= sent <= ended]
    ms = np.array([lat for _, lat, _ in counted]) * 1000
    return {
        "concurrency": concurrency,
        "seconds": ended - started,
        "scrapes": len(counted),
        "scrapes_failed": sum(not ok for _, _, ok in counted),
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "requests": load["requests"],
        "requests_failed": load["failed"],
        "chunks_per_s": load["tokens"] / (ended - started),
        "samples": [[round(t, 4), round(lat * 1000, 3)] for t, lat, _ in counted],
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| concurrency | scrapes | p50 ms | p90 ms | p99 ms | max ms | requests done | chunks/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        scrapes = f"{r['scrapes']}" + (f" ({r['scrapes_failed']} failed)" if r["scrapes_failed"] else "")
        requests = f"{r['requests']}" + (f" ({r['requests_failed']} failed)" if r["requests_failed"] else "")
        lines.append(
            f"| {r['concurrency']} | {scrapes} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} "
            f"| {r['max_ms']:.1f} | {requests} | {r['chunks_per_s']:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], title: str, path: Path) -> None:
    """Left: each scrape's latency over its level's run; right: p50/p99/max per level against the goals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    for i, r in enumerate(rows):
        t = [s[0] for s in r["samples"]]
        left.plot(t, [s[1] for s in r["samples"]], ".", markersize=2, color=f"C{i}", label=f"{r['concurrency']}")
    for goal, style in ((GOAL_P99_MS, "--"), (GOAL_MAX_MS, ":")):
        left.axhline(goal, color="red", linestyle=style, linewidth=1)
    left.set(xlabel="seconds into the level", ylabel="GET /metrics ms", yscale="log", title="Scrape latency")
    left.legend(title="concurrency", fontsize=8)
    x = np.arange(len(rows))
    for j, key in enumerate(("p50_ms", "p99_ms", "max_ms")):
        right.bar(x + (j - 1) * 0.27, [r[key] for r in rows], 0.27, label=key.removesuffix("_ms"))
    right.axhline(GOAL_P99_MS, color="red", linestyle="--", linewidth=1, label="p99 goal")
    right.axhline(GOAL_MAX_MS, color="red", linestyle=":", linewidth=1, label="max goal")
    right.set(xticks=x, xticklabels=[str(r["concurrency"]) for r in rows], xlabel="concurrent streams")
    right.set(ylabel="ms", title="Per level")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", help="a running server (without /v1); default: start `kiln serve` here")
    parser.add_argument("--api-key", help="sent as Authorization: Bearer KEY")
    parser.add_argument("--seconds", type=float, default=15.0, help="load per level (default 15)")
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 8, 16, 32], help="concurrencies (0 8 16 32)")
    parser.add_argument("--label", default="", help="added to the result file names (e.g. before, after)")
    args = parser.parse_args()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S") + (f"-{args.label}" if args.label else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    process = None
    base_url = args.base_url
    if not base_url:
        log_path = RESULTS / f"metrics_latency-{stamp}-server.log"
        print(f"starting kiln serve (log: {log_path}) ...", flush=True)
        process, base_url = start_server({}, log_path)
    title = f"kiln GET /metrics latency under streaming load: {cpu_model()}"
    print(f"# {title}", flush=True)
    rows = []
    try:
        for concurrency in args.levels:
            rows.append(measure(base_url, auth(args.api_key), concurrency, args.seconds))
            print(f"  concurrency {concurrency}: p99 {rows[-1]['p99_ms']:.1f} ms", flush=True)
    finally:
        if process:
            print(f"kiln serve exited with {stop_server(process)} after SIGTERM", flush=True)
    print(markdown(rows))
    top = rows[-1]
    met = top["p99_ms"] < GOAL_P99_MS and top["max_ms"] < GOAL_MAX_MS
    print(f"goal at concurrency {top['concurrency']} (p99 < {GOAL_P99_MS:g} ms, max < {GOAL_MAX_MS:g} ms): ", end="")
    print("met" if met else "NOT met")
    doc = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "base_url": base_url,
        "started_server": process is not None,
        "scrape_interval_ms": SCRAPE_INTERVAL_S * 1000,
        "warmup_s": WARMUP_S,
        "max_tokens": MAX_TOKENS,
        "goal": {"p99_ms": GOAL_P99_MS, "max_ms": GOAL_MAX_MS, "met": met},
        "levels": rows,
    }
    out = RESULTS / f"metrics_latency-{stamp}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    plot(rows, title, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
