"""HTTP throughput as a client sees it: streamed chat completions at several concurrency levels.

Reports time to first token (p50/p90, from sending the request to the first content chunk) and
output tokens per second (all completion tokens / wall time of the level), prints a table and
writes JSON to bench/results/. Targets a running server (--url) or starts `kiln serve` itself.

    python bench/http_throughput.py                          # starts a server with the default model
    python bench/http_throughput.py --url http://localhost:8000 --concurrency 1 8 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "List some uses of copper and why it is chosen for them.",
    "Describe a walk through a busy market in the morning.",
    "What makes a good cup of tea? Explain step by step.",
    "Tell me about the life cycle of a star.",
    "Write a letter to a friend about a recent trip to the mountains.",
    "Why do cats purr? Give a few possible reasons.",
]


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first_token = None
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event["choices"] and event["choices"][0]["delta"].get("content") and first_token is None:
                first_token = time.perf_counter()
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    finished = time.perf_counter()
    return {"ttft_s": (first_token or finished) - started, "latency_s": finished - started, "tokens": tokens}


async def run_level(base_url: str, headers: dict, model: str, concurrency: int, num_requests: int,
                    max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=600, limits=limits) as client:
        queue = list(range(num_requests))
        results: list[dict] = []

        async def worker():
            while queue:
                i = queue.pop(0)
                results.append(await one_request(client, model, PROMPTS[i % len(PROMPTS)], max_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ttft = np.array([r["ttft_s"] for r in results])
    tokens = sum(r["tokens"] for r in results)
    per_stream = [r["tokens"] / max(r["latency_s"] - r["ttft_s"], 1e-9) for r in results]
    return {
        "concurrency": concurrency,
        "requests": num_requests,
        "max_tokens": max_tokens,
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p90_s": float(np.percentile(ttft, 90)),
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tok_per_s": tokens / wall,
        "per_stream_tok_per_s_p50": float(np.percentile(per_stream, 50)),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(extra_args: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port",
                                str(port), "--log-level", "warning", *extra_args], cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"kiln serve exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/v1/health/ready", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit("kiln serve was not ready within 600 s")


def print_table(rows: list[dict]) -> None:
    header = f"{'concurrency':>11} {'requests':>8} {'TTFT p50':>9} {'TTFT p90':>9} {'out tok/s':>10} {'tok/s/stream':>12}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['concurrency']:>11} {r['requests']:>8} {r['ttft_p50_s']:>8.3f}s {r['ttft_p90_s']:>8.3f}s "
              f"{r['output_tok_per_s']:>10.1f} {r['per_stream_tok_per_s_p50']:>12.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start `kiln serve` with the default model)")
    parser.add_argument("--api-key", default=os.environ.get("KILN_API_KEY"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--requests", type=int, help="requests per level (default: 4, or 2x the concurrency)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--server-args", default="", help="extra `kiln serve` flags when the script starts it")
    args = parser.parse_args()

    process = None
    url = args.url
    if url is None:
        process, url = start_server(args.server_args.split())
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        metadata = httpx.get(f"{url}/v1/metadata", headers=headers, timeout=30).json()
        model = metadata["model"]
        asyncio.run(run_level(url, headers, model, 1, 1, 4))  # warm-up
        rows = []
        for concurrency in args.concurrency:
            num_requests = args.requests or max(4, 2 * concurrency)
            rows.append(asyncio.run(run_level(url, headers, model, concurrency, num_requests, args.max_tokens)))
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    print(f"kiln HTTP throughput: {model} ({metadata['backend']}, {metadata['precision']} on {metadata['hardware']})")
    print_table(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"http_throughput-{stamp}.json"
    out.write_text(json.dumps({"created": stamp, "url": url, "metadata": metadata, "results": rows}, indent=2))
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
