"""Resident memory of a kiln server: idle after warm-up, under a closed loop at concurrency 32, idle after it.

Phases, each sampling the server's /proc/PID/status and /proc/PID/smaps:
  ready       /v1/health/ready answers 200 (the engine has warmed up);
  warm idle   after `--warm-up` sequential chat requests and `--settle` seconds without work (the step loop
              hands freed heap back after 2 s idle, engines/torch/engine.py);
  c=32        peak and last VmRSS while `--concurrency` workers each send one chat request after another for
              `--duration` s (prompts of 128 words, max_tokens 128, ignore_eos), until the last one finishes;
  idle after  `--settle` seconds after that load.
Each phase is split into the KV pool's resident pages (the largest anonymous mapping: the host pool is one
mmap, engines/torch/lazy_memory.py), the rest of the anonymous memory (weights, packed weights, Python,
allocator caches) and file-backed pages (shared libraries).

    python -m bench.rss                                   # starts `kiln serve` (no flags), stops it after
    python -m bench.rss --base-url http://127.0.0.1:8000 --pid 1234
Prints a Markdown table; writes JSON and a PNG (VmRSS over time) to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

from bench.event_loop import RESULTS, auth, cpu_model, start_server, stop_server, words

KV_MAPPING_MIN_BYTES = 64 << 20  # a smaller largest mapping is not a KV pool (the default one is 1 GiB)
MIB = 1 << 20


def memory(pid: int) -> dict[str, float]:
    """VmRSS and its parts in MiB: kv (resident pages of the largest anonymous mapping), other_anon, file."""
    status = Path(f"/proc/{pid}/status").read_text()

    def kib(field: str) -> int:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1))

    largest = (0, 0)  # (size, rss) in KiB of the largest anonymous mapping
    size = rss = 0
    anonymous = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            if anonymous and size > largest[0]:
                largest = (size, rss)
            anonymous, size, rss = len(fields) < 6, 0, 0
        elif fields[0] == "Size:":
            size = int(fields[1])
        elif fields[0] == "Rss:":
            rss = int(fields[1])
    if anonymous and size > largest[0]:
        largest = (size, rss)
    kv = largest[1] if largest[0] * 1024 >= KV_MAPPING_MIN_BYTES else 0
    return {
        "vm_rss": kib("VmRSS") / 1024,
        "kv": kv / 1024,
        "other_anon": (kib("RssAnon") - kv) / 1024,
        "file": kib("RssFile") / 1024,
        "kv_pool_size": largest[0] / 1024 if kv else 0.0,
    }


async def chat(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }
    response = await client.post("/v1/chat/completions", json=body)
    response.raise_for_status()


async def run(args, base_url: str, pid: int) -> dict:
    vocabulary = words()
    rng = random.Random(0)

    def prompt() -> str:
        return " ".join(rng.choice(vocabulary) for _ in range(args.prompt_words))

    samples: list[dict] = []
    t0 = time.monotonic()
    phases: dict[str, dict[str, float]] = {"ready": memory(pid)}
    async with httpx.AsyncClient(base_url=base_url, headers=auth(args.api_key), timeout=600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        for _ in range(args.warm_up):
            await chat(client, model, prompt(), args.max_tokens)
        await asyncio.sleep(args.settle)
        phases["warm idle"] = memory(pid)

        stop = asyncio.Event()
        peak: dict[str, float] = {"vm_rss": 0.0}
        requests = 0

        async def worker() -> None:
            nonlocal requests
            while not stop.is_set():
                await chat(client, model, prompt(), args.max_tokens)
                requests += 1

        drained = asyncio.Event()  # sampling goes on while the requests in flight at `stop` finish

        async def sampler() -> None:
            nonlocal peak
            while not drained.is_set():
                now = memory(pid)
                samples.append({"t": round(time.monotonic() - t0, 2), **now})
                peak = max(peak, now, key=lambda m: m["vm_rss"])
                await asyncio.sleep(args.interval)

        tasks = [asyncio.create_task(worker()) for _ in range(args.concurrency)]
        sampling = asyncio.create_task(sampler())
        await asyncio.sleep(args.duration)
        stop.set()
        await asyncio.gather(*tasks)
        drained.set()
        await sampling
        end = memory(pid)
        phases[f"c={args.concurrency} peak"] = max(peak, end, key=lambda m: m["vm_rss"])
        phases[f"c={args.concurrency} end"] = end
        await asyncio.sleep(args.settle)
        phases["idle after"] = memory(pid)
    return {"phases": phases, "samples": samples, "requests_under_load": requests, "model": model}


def table(result: dict) -> str:
    lines = [
        "| phase | VmRSS MiB | KV pool resident | other anonymous | file-backed |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, m in result["phases"].items():
        lines.append(f"| {name} | {m['vm_rss']:.0f} | {m['kv']:.0f} | {m['other_anon']:.0f} | {m['file']:.0f} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    t = [s["t"] for s in result["samples"]]
    ax.plot(t, [s["vm_rss"] for s in result["samples"]], label="VmRSS")
    ax.plot(t, [s["kv"] for s in result["samples"]], label="KV pool resident")
    ax.axhline(result["phases"]["warm idle"]["vm_rss"], color="grey", linestyle=":", label="warm idle")
    ax.set_xlabel("s since ready")
    ax.set_ylabel("MiB")
    ax.set_title(f"kiln RSS under load at c={result['args']['concurrency']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", help="a running server (give --pid too); default: start `kiln serve`")
    parser.add_argument("--pid", type=int, help="the running server's process id")
    parser.add_argument("--api-key")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--warm-up", type=int, default=4, help="sequential requests before the idle sample")
    parser.add_argument("--settle", type=float, default=5.0, help="idle seconds before an idle sample")
    parser.add_argument("--prompt-words", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples under load")
    args = parser.parse_args()
    if bool(args.base_url) != bool(args.pid):
        parser.error("--base-url and --pid go together")

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    process = None
    if args.base_url:
        base_url, pid = args.base_url, args.pid
    else:
        process, base_url = start_server({}, RESULTS / f"rss-{stamp}-server.log")
        pid = process.pid
    try:
        result = asyncio.run(run(args, base_url, pid))
    finally:
        if process is not None:
            stop_server(process)
    result |= {"args": vars(args), "cpu": cpu_model(), "when": stamp}
    print(f"{cpu_model()}, {result['model']}, {result['requests_under_load']} requests under load")
    print(table(result))
    out = RESULTS / f"rss-{stamp}.json"
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
