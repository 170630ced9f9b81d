"""Soak test of a kiln server: a long mixed load, then checks that nothing leaked.

`--concurrency` workers each send one request after another for `--duration` seconds: chat or completions,
streaming or not, prompts of 8..400 English words, max_tokens 8..256 (ignore_eos, so that max_tokens is the
length). 20% of the streams are abandoned: the client closes the connection after 1..8 chunks. 2% of the
requests (`--bad-fraction`) are deliberately bad (temperature -1, an unknown model, malformed JSON, top_k 2**63,
a lone surrogate "a\\ud800b" as the text) and must get a 4xx with OpenAI's {"error": {...}} envelope. An
unexpected error is any other outcome: a 5xx, a 4xx on a good request, a bad request not refused, a stream
without [DONE], an error event in a stream, a transport error before the client chose to close.

Every few seconds the script samples the server's RSS (/proc/<pid>/status VmRSS) and the /metrics gauges. After
the load it waits for the server to go idle, then checks the goals (exit status 1 if one fails):
  - no unexpected errors;
  - kiln:num_requests_running = kiln:num_requests_waiting = 0;
  - kiln:kv_cache_usage_perc = 0. It counts the KV blocks some sequence holds (BlockManager.num_used: ref_count
    > 0); blocks the prefix cache keeps for finished requests are reusable and not counted, so a non-zero value
    at idle is a leak;
  - RSS growth < 5% from the warm-up point (60 s into the load, or half of a shorter run) to the end.

    python -m bench.soak                                    # starts `kiln serve` on a free port, stops it after
    python -m bench.soak --duration 60 --concurrency 8
    python -m bench.soak --base-url http://127.0.0.1:8000 --pid 1234
Prints progress every 30 s and a Markdown table at the end; writes JSON and PNG (RSS and KV usage over time) to
bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from math import nan
from pathlib import Path

import httpx

from bench.event_loop import RESULTS, auth, cpu_model, start_server, stop_server, words

ABANDON_FRACTION = 0.2
BAD_CASES = ("temperature -1", "unknown model", "malformed JSON", "top_k 2**63", "lone surrogate")
REQUEST_TIMEOUT_S = 300
MAX_UNEXPECTED = 100  # past this the server is broken; more requests would only repeat the error
PROGRESS_S = 30
RSS_WARMUP_S = 60
GOAL_RSS_GROWTH = 0.05
EXAMPLES = 5
GAUGES = ("kiln:num_requests_running", "kiln:num_requests_waiting", "kiln:kv_cache_usage_perc")
_METRIC_LINE = re.compile(r"^(kiln:[a-z0-9_]+)(?:\{[^}]*\})? (\S+)$", re.M)


@dataclass
class Tally:
    sent: Counter = field(default_factory=Counter)  # good / abandoned / bad
    completed: int = 0  # good requests answered in full
    abandoned: int = 0  # streams closed by the client as planned
    refused: int = 0  # bad requests refused with a 4xx error envelope
    output_tokens: int = 0  # completion tokens of the completed requests (their usage)
    unexpected: int = 0
    examples: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.unexpected += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(what[:300])


def bad_content(case: str, chat: bool) -> bytes:
    if case == "malformed JSON":
        return b'{"max_tokens": 8, "prompt": "unterminated'
    text = "a\ud800b" if case == "lone surrogate" else "Hello"
    body = {"max_tokens": 8} | ({"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text})
    body |= {
        "temperature -1": {"temperature": -1},
        "unknown model": {"model": "no-such-model"},
        "top_k 2**63": {"top_k": 2**63},
    }.get(case, {})
    return json.dumps(body).encode()  # ensure_ascii writes the lone surrogate as the escape \ud800


async def send_bad(client: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    case, chat = rng.choice(BAD_CASES), rng.random() < 0.5
    tally.sent["bad"] += 1
    label = f"bad {case} ({'chat' if chat else 'completions'})"
    try:
        response = await client.post(
            "/v1/chat/completions" if chat else "/v1/completions",
            content=bad_content(case, chat),
            headers={"Content-Type": "application/json"},
        )
        envelope = response.json().get("error") if 400 <= response.status_code < 500 else None
    except (httpx.HTTPError, ValueError) as exc:
        tally.error(f"{label}: {type(exc).__name__}: {exc}")
        return
    if isinstance(envelope, dict) and envelope.get("message"):
        tally.refused += 1
    else:
        tally.error(f"{label}: HTTP {response.status_code} {response.text[:200]}")


async def send_good(client: httpx.AsyncClient, rng: random.Random, text: list[str], tally: Tally) -> None:
    chat, stream = rng.random() < 0.5, rng.random() < 0.5
    abandon_after = rng.randint(1, 8) if stream and rng.random() < ABANDON_FRACTION else None
    tally.sent["abandoned" if abandon_after else "good"] += 1
    length = rng.randint(8, 400)
    start = rng.randrange(len(text) - length)  # a random place in the text: few shared prefixes
    prompt = " ".join(text[start : start + length])
    body = {
        "max_tokens": rng.randint(8, 256),
        "temperature": rng.choice([0.0, 0.8]),
        "ignore_eos": True,
        "stream": stream,
    } | ({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    path = "/v1/chat/completions" if chat else "/v1/completions"
    label = f"{'abandoned' if abandon_after else 'good'} {'stream' if stream else 'plain'} {path}"
    try:
        if not stream:
            response = await client.post(path, json=body)
            if response.status_code != 200 or not response.json().get("choices"):
                tally.error(f"{label}: HTTP {response.status_code} {response.text[:200]}")
                return
            tally.completed += 1
            tally.output_tokens += response.json()["usage"]["completion_tokens"]
            return
        body["stream_options"] = {"include_usage": True}
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                tally.error(f"{label}: HTTP {response.status_code} {(await response.aread())[:200]!r}")
                return
            chunks = 0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    tally.completed += 1
                    return
                event = json.loads(line[6:])
                if "error" in event:
                    tally.error(f"{label}: error event {line[:200]}")
                    return
                if event.get("usage"):
                    tally.output_tokens += event["usage"]["completion_tokens"]
                chunks += bool(event.get("choices"))
                if abandon_after and chunks >= abandon_after:
                    tally.abandoned += 1
                    return  # leaving the block closes the unread response, and so the connection
            tally.error(f"{label}: stream ended without [DONE]")
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        tally.error(f"{label}: {type(exc).__name__}: {exc}")


async def worker(
    client: httpx.AsyncClient,
    rng: random.Random,
    text: list[str],
    tally: Tally,
    bad_fraction: float,
    deadline: float,
    stop: asyncio.Event,
) -> None:
    while time.monotonic() < deadline and not stop.is_set() and tally.unexpected < MAX_UNEXPECTED:
        if rng.random() < bad_fraction:
            await send_bad(client, rng, tally)
        else:
            await send_good(client, rng, text, tally)


def rss_mib(pid: int) -> float | None:
    """VmRSS of the process, or None once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return None
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) / 1024


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    """kiln:* samples of /metrics by name (labels dropped; kiln has one model), {} if the server does not answer."""
    try:
        text = (await client.get("/metrics")).text
    except httpx.HTTPError:
        return {}
    return {name: float(value) for name, value in _METRIC_LINE.findall(text)}


async def sampler(
    client: httpx.AsyncClient, pid: int, t0: float, samples: list, tally: Tally, interval: float, stop: asyncio.Event
) -> None:
    """A sample every `interval` s and a progress line every PROGRESS_S s; sets `stop` if the server exits."""
    next_progress = PROGRESS_S
    while not stop.is_set():
        metrics, rss = await scrape(client), rss_mib(pid)
        t = time.monotonic() - t0
        samples.append({"t": round(t, 2), "rss_mib": rss} | {g: metrics.get(g) for g in GAUGES})
        if rss is None:
            print(f"[{t:5.0f} s] the server process {pid} has exited", flush=True)
            stop.set()
        if t >= next_progress:
            next_progress += PROGRESS_S
            print(
                f"[{t:5.0f} s] sent {sum(tally.sent.values())} ({dict(tally.sent)}), completed {tally.completed}, "
                f"unexpected {tally.unexpected}, RSS {rss or 0:.0f} MiB, running "
                f"{metrics.get(GAUGES[0], nan):.0f}, waiting {metrics.get(GAUGES[1], nan):.0f}, "
                f"KV {metrics.get(GAUGES[2], nan):.1%}",
                flush=True,
            )
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except asyncio.TimeoutError:
            pass


async def wait_idle(client: httpx.AsyncClient, timeout: float) -> tuple[bool, dict[str, float]]:
    deadline = time.monotonic() + timeout
    while True:
        metrics = await scrape(client)
        idle = metrics.get(GAUGES[0]) == 0 and metrics.get(GAUGES[1]) == 0
        if idle or not metrics or time.monotonic() > deadline:  # no metrics: the server is gone
            return idle, metrics
        await asyncio.sleep(0.5)


async def soak(base_url: str, headers: dict, pid: int, args) -> dict:
    text = words()
    tally, samples, stop = Tally(), [], asyncio.Event()
    load = httpx.AsyncClient(
        base_url=base_url,
        headers=headers,
        timeout=REQUEST_TIMEOUT_S,
        limits=httpx.Limits(max_connections=args.concurrency),
    )
    # the monitor has its own connection, so that samples are never queued behind the load
    async with load as client, httpx.AsyncClient(base_url=base_url, timeout=10) as monitor:
        before = await scrape(monitor)
        t0 = time.monotonic()
        sampling = asyncio.create_task(sampler(monitor, pid, t0, samples, tally, args.sample_interval, stop))
        await asyncio.gather(
            *(
                worker(client, random.Random(args.seed + i), text, tally, args.bad_fraction, t0 + args.duration, stop)
                for i in range(args.concurrency)
            )
        )
        load_s = time.monotonic() - t0
        idle, final = await wait_idle(monitor, args.idle_timeout)
        stop.set()
        await sampling
    end_rss = rss_mib(pid)
    samples.append({"t": round(time.monotonic() - t0, 2), "rss_mib": end_rss} | {g: final.get(g) for g in GAUGES})
    warm = next((s["rss_mib"] for s in samples if s["t"] >= min(RSS_WARMUP_S, args.duration / 2)), None)
    generated = final.get("kiln:generation_tokens_total", 0) - before.get("kiln:generation_tokens_total", 0)
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "base_url": base_url,
        "duration_s": args.duration,
        "concurrency": args.concurrency,
        "bad_fraction": args.bad_fraction,
        "seed": args.seed,
        "load_s": load_s,
        "sent": dict(tally.sent),
        "completed": tally.completed,
        "abandoned": tally.abandoned,
        "bad_refused": tally.refused,
        "unexpected_errors": tally.unexpected,
        "examples": tally.examples,
        "output_tokens_per_s": tally.output_tokens / load_s,
        "generated_tokens_per_s": generated / load_s,
        "idle": idle,
        "final": {g: final.get(g) for g in GAUGES},
        "rss_warm_mib": warm,
        "rss_end_mib": end_rss,
        "rss_growth": (end_rss - warm) / warm if warm and end_rss else None,
        "samples": samples,
    }


def goals(doc: dict) -> list[tuple[str, str, bool]]:
    """(goal, measured, met) for each goal."""
    final, growth = doc["final"], doc["rss_growth"]
    return [
        ("no unexpected errors", str(doc["unexpected_errors"]), doc["unexpected_errors"] == 0),
        ("idle after the load: running = waiting = 0", f"{final[GAUGES[0]]} / {final[GAUGES[1]]}", doc["idle"]),
        ("no leaked KV blocks: kv_cache_usage_perc = 0", str(final[GAUGES[2]]), final[GAUGES[2]] == 0),
        (
            "RSS growth < 5%",
            "server gone"
            if growth is None
            else f"{growth:+.1%} ({doc['rss_warm_mib']:.0f} -> {doc['rss_end_mib']:.0f} MiB)",
            growth is not None and growth < GOAL_RSS_GROWTH,
        ),
    ]


def markdown(doc: dict) -> str:
    sent = doc["sent"]
    lines = [
        "| measure | value |",
        "|---|---|",
        f"| load | {doc['load_s']:.0f} s at concurrency {doc['concurrency']} |",
        f"| sent: good / abandoned / bad | {sent.get('good', 0)} / {sent.get('abandoned', 0)} / {sent.get('bad', 0)} |",
        f"| completed / abandoned as planned / bad refused with 4xx | {doc['completed']} / {doc['abandoned']} / "
        f"{doc['bad_refused']} |",
        f"| output tok/s: completed requests / server generated | {doc['output_tokens_per_s']:.1f} / "
        f"{doc['generated_tokens_per_s']:.1f} |",
        "",
        "| goal | measured | met |",
        "|---|---|---|",
    ]
    lines += [f"| {goal} | {value} | {'yes' if met else 'NO'} |" for goal, value, met in goals(doc)]
    if doc["examples"]:
        lines += ["", "First unexpected errors:"] + [f"- `{e}`" for e in doc["examples"]]
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    """Top: server RSS; bottom: KV-cache usage and running / waiting requests, over the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = doc["samples"]
    t = [s["t"] for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    top.plot(t, [s["rss_mib"] for s in samples], marker=".")
    if doc["rss_warm_mib"]:
        top.axhline(
            doc["rss_warm_mib"] * (1 + GOAL_RSS_GROWTH),
            color="red",
            linestyle="--",
            linewidth=1,
            label="warm-up RSS + 5%",
        )
        top.legend(fontsize=8)
    top.set(ylabel="RSS MiB", title=f"kiln soak: concurrency {doc['concurrency']}, {doc['load_s']:.0f} s load")
    usage = [None if s[GAUGES[2]] is None else s[GAUGES[2]] * 100 for s in samples]
    bottom.plot(t, usage, color="C1", label="KV-cache usage %")
    bottom.set(xlabel="seconds", ylabel="KV usage %")
    requests = bottom.twinx()
    requests.plot(t, [s[GAUGES[0]] for s in samples], color="C2", linewidth=1, label="running")
    requests.plot(t, [s[GAUGES[1]] for s in samples], color="C3", linewidth=1, label="waiting")
    requests.set_ylabel("requests")
    bottom.axvline(doc["duration_s"], color="grey", linestyle=":", linewidth=1)  # no request is sent after it
    lines = bottom.get_lines()[:1] + requests.get_lines()
    bottom.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="upper left")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (default 32)")
    parser.add_argument("--base-url", help="a running server (without /v1); needs --pid. Default: start `kiln serve`")
    parser.add_argument("--pid", type=int, help="the --base-url server's process id, for its RSS")
    parser.add_argument("--api-key", help="sent as Authorization: Bearer KEY")
    parser.add_argument("--sample-interval", type=float, default=2.0, help="seconds between samples (default 2)")
    parser.add_argument("--idle-timeout", type=float, default=120, help="seconds to wait for idle (default 120)")
    parser.add_argument("--bad-fraction", type=float, default=0.02, help="share of bad requests (default 0.02)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.base_url and not args.pid:
        parser.error("--base-url needs --pid (the server's process, for its RSS)")
    if args.duration <= 0 or args.concurrency < 1:
        parser.error("--duration must be > 0 and --concurrency >= 1")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    process, base_url, pid = None, args.base_url, args.pid
    if not base_url:
        log_path = RESULTS / f"soak-{stamp}-server.log"
        print(f"starting kiln serve (log: {log_path}) ...", flush=True)
        process, base_url = start_server({}, log_path)
        pid = process.pid
    print(
        f"# kiln soak: {base_url}, {args.duration:.0f} s at concurrency {args.concurrency}, CPU {cpu_model()}",
        flush=True,
    )
    try:
        doc = asyncio.run(soak(base_url, auth(args.api_key), pid, args))
    finally:
        if process:
            print(f"kiln serve exited with {stop_server(process)} after SIGTERM", flush=True)
    print(markdown(doc))
    out = RESULTS / f"soak-{stamp}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0 if all(met for _, _, met in goals(doc)) else 1


if __name__ == "__main__":
    sys.exit(main())
