"""Event-loop responsiveness of a kiln server while hostile or heavy requests are in flight.

A probe process polls GET /v1/health/live every 20 ms, one request at a time on its own keep-alive connection;
that route does no work, so its latency is how long the server's event loop takes to get to a request. The
probe is a separate process so that the load this script generates cannot delay it. Scenarios, one after another:

  baseline         no load, 5 s
  body 16 MiB      one POST /v1/completions whose prompt is 16 MiB of English words (sent with Content-Length).
                   The server the script starts gets KILN_MAX_REQUEST_BODY_BYTES=32 MiB (`--max-request-body-bytes`),
                   so the body is read, tokenized and then refused for exceeding the context: expect 400.
  body over limit  the same prompt grown to 1 MiB over that limit: expect a fast 413. This stands in for the 16 MiB
                   body against the default limit, without starting a second server.
  32 streams       32 concurrent streaming /v1/chat/completions (max_tokens 64, ignore_eos) until all finish
  100k messages    one POST /v1/chat/completions with 100,000 short user/assistant messages: expect a fast 400

Each scenario's probes are those sent from the start of its load until 1 s after it ends (leftover work, such as
tokenizing a prompt whose request has already failed, shows there). The goal is probe p99 < 100 ms in every one.

    python -m bench.event_loop                                   # starts `kiln serve` on a free port, stops it after
    python -m bench.event_loop --base-url http://127.0.0.1:8000 --body-limit 33554432   # a running server
Prints a Markdown table and writes JSON and PNG (probe latency over time, p99 per scenario) to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TEXTS = REPO / "build" / "calibration" / "calib.jsonl"
READY_TIMEOUT_S = 1200  # a first start converts the model and compiles CPU kernels
LOAD_TIMEOUT_S = 600
PROBE_TIMEOUT_S = 60
PROBE_INTERVAL_S = 0.02
BASELINE_S = 5.0
SETTLE_S = 1.0
GOAL_P99_MS = 100.0
MiB = 2**20


# ---- shared with soak.py ------------------------------------------------------------------------
def cpu_model() -> str:
    match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    return f"{match.group(1) if match else 'unknown CPU'} ({os.cpu_count()} cores)"


def words() -> list[str]:
    """The words of kiln's calibration chats: ordinary English prompts."""
    lines = TEXTS.read_text().splitlines()
    return [w for line in lines for m in json.loads(line)["messages"] for w in m["content"].split()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """`kiln serve` with the default model on a free loopback port, once /v1/health/ready answers 200.
    The caller's KILN_* variables are dropped (as the tests do) so that only `env` configures the server."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KILN_") or k == "KILN_CACHE_DIR"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env=clean | env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"kiln serve exited with {process.returncode}; see {log_path}")
        try:
            if httpx.get(f"{base_url}/v1/health/ready", timeout=5).status_code == 200:
                return process, base_url
        except httpx.TransportError:
            pass
        time.sleep(1)
    stop_server(process)
    raise RuntimeError(f"kiln serve was not ready within {READY_TIMEOUT_S} s; see {log_path}")


def stop_server(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def auth(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


# ---- probe --------------------------------------------------------------------------------------
def probe(base_url: str, stop, conn) -> None:
    """In its own process: (sent at, seconds, ok) for each GET /v1/health/live until `stop` is set.
    time.monotonic is system-wide on Linux, so the parent can compare these times with its own."""
    samples = []
    with httpx.Client(base_url=base_url, timeout=PROBE_TIMEOUT_S) as client:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                ok = client.get("/v1/health/live").status_code == 200
            except httpx.HTTPError:
                ok = False
            samples.append((sent, time.monotonic() - sent, ok))
            stop.wait(PROBE_INTERVAL_S)
    conn.send(samples)


# ---- loads: each returns the HTTP status (or transport error) of every request it sent ------------
async def post(base_url: str, headers: dict, path: str, content: bytes) -> list:
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=LOAD_TIMEOUT_S) as client:
        try:
            response = await client.post(path, content=content, headers={"Content-Type": "application/json"})
            return [response.status_code]
        except httpx.HTTPError as exc:
            return [type(exc).__name__]


async def streams(base_url: str, headers: dict, count: int) -> list:
    async def one(client: httpx.AsyncClient, i: int):
        body = {
            "messages": [{"role": "user", "content": f"Write a story about lighthouse number {i}."}],
            "max_tokens": 64,
            "ignore_eos": True,
            "stream": True,
        }
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                async for _ in response.aiter_lines():
                    pass
                return response.status_code
        except httpx.HTTPError as exc:
            return type(exc).__name__

    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=LOAD_TIMEOUT_S, limits=httpx.Limits(max_connections=count)
    ) as client:
        return list(await asyncio.gather(*(one(client, i) for i in range(count))))


def prompt_body(size: int, text: list[str]) -> bytes:
    """A completions body whose prompt is `size` bytes of the words, repeated as needed."""
    chunk = " ".join(text)
    prompt = (chunk + " ") * (size // (len(chunk) + 1) + 1)
    return json.dumps({"prompt": prompt[:size], "max_tokens": 16}).encode()


def scenarios(body_limit: int) -> list[tuple[str, Callable]]:
    """(name, coroutine factory taking base_url and headers); request bodies are built here, before any timing."""
    text = words()
    big = prompt_body(16 * MiB, text)
    over = prompt_body(body_limit + MiB, text)
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"} for i in range(100_000)]
    many = json.dumps({"messages": messages, "max_tokens": 16}).encode()
    return [
        ("baseline (no load)", lambda url, h: asyncio.sleep(BASELINE_S, [])),
        (
            f"body {len(big) / MiB:.0f} MiB (limit {body_limit / MiB:.0f} MiB)",
            lambda url, h: post(url, h, "/v1/completions", big),
        ),
        (f"body {len(over) / MiB:.0f} MiB (over the limit)", lambda url, h: post(url, h, "/v1/completions", over)),
        ("32 chat streams x 64 tokens", lambda url, h: streams(url, h, 32)),
        (
            f"chat with 100k messages ({len(many) / MiB:.1f} MiB)",
            lambda url, h: post(url, h, "/v1/chat/completions", many),
        ),
    ]


def summarize(name: str, statuses: list, start: float, end: float, samples: list) -> dict:
    window = [(lat, ok) for sent, lat, ok in samples if start <= sent <= end + SETTLE_S]
    ms = np.array([lat for lat, _ in window] or [np.nan]) * 1000
    p99 = float(np.percentile(ms, 99))
    return {
        "scenario": name,
        "statuses": dict(Counter(str(s) for s in statuses)),
        "load_s": end - start,
        "probes": len(window),
        "probes_failed": sum(not ok for _, ok in window),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": p99,
        "max_ms": float(np.max(ms)),
        "goal_met": bool(p99 < GOAL_P99_MS),
        "start": start,
        "end": end,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| scenario | load status | load s | probes | p50 ms | p99 ms | max ms | p99 < 100 ms |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        status = ", ".join(f"{s}" if n == 1 else f"{s} x{n}" for s, n in r["statuses"].items()) or "-"
        probes = f"{r['probes']}" + (f" ({r['probes_failed']} failed)" if r["probes_failed"] else "")
        lines.append(
            f"| {r['scenario']} | {status} | {r['load_s']:.2f} | {probes} | {r['p50_ms']:.1f} "
            f"| {r['p99_ms']:.1f} | {r['max_ms']:.1f} | {'yes' if r['goal_met'] else 'NO'} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], samples: list, path: Path) -> None:
    """Left: every probe's latency over time, scenario windows shaded; right: p99 per scenario and the goal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    t0 = rows[0]["start"]
    left.plot([s - t0 for s, _, _ in samples], [lat * 1000 for _, lat, _ in samples], ".", markersize=2)
    for i, r in enumerate(rows):
        left.axvspan(r["start"] - t0, r["end"] + SETTLE_S - t0, color=f"C{i + 1}", alpha=0.15, label=r["scenario"])
    left.axhline(GOAL_P99_MS, color="red", linestyle="--", linewidth=1)
    left.set(xlabel="seconds", ylabel="GET /v1/health/live ms", yscale="log", title="Probe latency over time")
    left.legend(fontsize=7, loc="upper right")
    names = [r["scenario"] for r in rows]
    right.barh(names, [r["p99_ms"] for r in rows], color=["C2" if r["goal_met"] else "C3" for r in rows])
    right.axvline(GOAL_P99_MS, color="red", linestyle="--", linewidth=1, label="goal 100 ms")
    right.set(xlabel="probe p99 ms", xscale="log", title="p99 per scenario")
    right.invert_yaxis()
    right.tick_params(axis="y", labelsize=7)
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(base_url: str, headers: dict, body_limit: int) -> tuple[list[dict], list]:
    loads = scenarios(body_limit)
    stop = mp.Event()
    receiver, sender = mp.Pipe(duplex=False)
    prober = mp.Process(target=probe, args=(base_url, stop, sender))
    prober.start()
    time.sleep(SETTLE_S)  # the probe's connection is open before the baseline starts
    rows = []
    try:
        for name, load in loads:
            start = time.monotonic()
            statuses = asyncio.run(load(base_url, headers))
            end = time.monotonic()
            rows.append((name, statuses, start, end))
            print(f"  {name}: {dict(Counter(map(str, statuses)))} in {end - start:.2f} s", flush=True)
            time.sleep(SETTLE_S)
    finally:
        stop.set()
        samples = receiver.recv()
        prober.join()
    return [summarize(*row, samples) for row in rows], samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", help="a running server (without /v1); default: start `kiln serve` here")
    parser.add_argument("--api-key", help="sent as Authorization: Bearer KEY")
    parser.add_argument(
        "--body-limit",
        type=int,
        default=32 * MiB,
        help="request-body limit in bytes: set on the server the script starts; with --base-url, "
        "the server's --max-request-body-bytes (default 33554432)",
    )
    args = parser.parse_args()
    if args.body_limit < 16 * MiB + MiB:
        parser.error("--body-limit must leave room for the 16 MiB body")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    process = None
    base_url = args.base_url
    if not base_url:
        log_path = RESULTS / f"event_loop-{stamp}-server.log"
        print(f"starting kiln serve (log: {log_path}) ...", flush=True)
        # the env variable rather than the flag: a server without the setting yet ignores it instead of exiting
        process, base_url = start_server({"KILN_MAX_REQUEST_BODY_BYTES": str(args.body_limit)}, log_path)
    print(f"# kiln event-loop responsiveness: {base_url}, CPU {cpu_model()}", flush=True)
    try:
        rows, samples = run(base_url, auth(args.api_key), args.body_limit)
    finally:
        if process:
            print(f"kiln serve exited with {stop_server(process)} after SIGTERM", flush=True)
    print(markdown(rows))
    doc = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "base_url": base_url,
        "started_server": process is not None,
        "body_limit": args.body_limit,
        "probe_interval_ms": PROBE_INTERVAL_S * 1000,
        "goal_p99_ms": GOAL_P99_MS,
        "scenarios": rows,
        "probes": [[round(s - rows[0]["start"], 4), round(lat * 1000, 3), ok] for s, lat, ok in samples],
    }
    out = RESULTS / f"event_loop-{stamp}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    plot(rows, samples, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
