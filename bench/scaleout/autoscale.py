"""Scenario (c): Prometheus scrapes both replicas every second; a burst makes requests queue (a small
--max-num-seqs and many concurrent requests), then the replicas idle. The per-pod kiln:num_requests_waiting series
from Prometheus's HTTP API, replayed through the HPA's formula (bench/scaleout/hpa.py), must recommend scaling up
under the burst and back down after it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from bench.scaleout import load
from bench.scaleout.hpa import HpaSpec, replay
from bench.scaleout.launcher import Service, require_binary, start_service
from bench.scaleout.replicas import Replica, free_port, start_replicas, stop_replicas

MAX_NUM_SEQS = 2
BURST = 24  # concurrent requests, half to each replica (as a Kubernetes Service would spread them)
MAX_TOKENS = 16
IDLE_BEFORE_S = 4
IDLE_AFTER_S = 20  # longer than the shortened scale-down window, so the recommendation comes back down
HPA = HpaSpec(target=5, min_replicas=1, max_replicas=6, tolerance=0.1, scale_down_window_s=10)
METRIC = "kiln:num_requests_waiting"

PROMETHEUS_CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: kiln
    static_configs:
{targets}
"""


def start_prometheus(replicas: list[Replica], work_dir: Path) -> tuple[Service, str]:
    targets = "\n".join(f"      - targets: ['127.0.0.1:{r.port}']\n        labels: {{pod: {r.name}}}" for r in replicas)
    config = work_dir / "prometheus.yml"
    config.write_text(PROMETHEUS_CONFIG.format(targets=targets))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        require_binary("prometheus"),
        f"--config.file={config}",
        f"--storage.tsdb.path={work_dir / 'prometheus-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    return start_service("prometheus", command, work_dir / "prometheus.log", f"{url}/-/ready"), url


def query(prometheus_url: str, promql: str, **params) -> list[dict]:
    path = "query_range" if "step" in params else "query"
    response = httpx.get(f"{prometheus_url}/api/v1/{path}", params={"query": promql, **params}, timeout=30)
    response.raise_for_status()
    return response.json()["data"]["result"]


def wait_for_targets(prometheus_url: str, count: int, timeout: float = 60) -> None:
    """Until Prometheus has scraped every replica at least once with the metric present."""
    deadline = time.monotonic() + timeout
    while len(query(prometheus_url, METRIC)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"Prometheus did not scrape {count} replicas within {timeout} s")
        time.sleep(0.5)


async def burst(replicas: list[Replica], model: str) -> list[load.Outcome]:
    apis = [load.client(r.url) for r in replicas]
    messages = [{"role": "user", "content": "Write a short story about a kiln."}]
    outcomes = await asyncio.gather(
        *(load.chat(apis[i % len(apis)], model, messages, MAX_TOKENS, stream=False) for i in range(BURST))
    )
    for api in apis:
        await api.close()
    return list(outcomes)


def series(prometheus_url: str, start: float, end: float) -> list[tuple[float, dict[str, float]]]:
    """(unix time, {pod: waiting}) every second, from Prometheus's range query."""
    by_time: dict[float, dict[str, float]] = {}
    for result in query(prometheus_url, METRIC, start=start, end=end, step="1s"):
        pod = result["metric"]["pod"]
        for stamp, value in result["values"]:
            by_time.setdefault(float(stamp), {})[pod] = float(value)
    return sorted(by_time.items())


def run(work_dir: Path, log_dir: Path) -> dict:
    replicas = start_replicas(2, log_dir / "autoscale", "--max-num-seqs", str(MAX_NUM_SEQS))
    prometheus = None
    try:
        model = httpx.get(f"{replicas[0].url}/v1/models", timeout=10).json()["data"][0]["id"]
        prometheus, prometheus_url = start_prometheus(replicas, work_dir)
        wait_for_targets(prometheus_url, len(replicas))
        start = time.time()
        time.sleep(IDLE_BEFORE_S)
        burst_start = time.time()
        outcomes = asyncio.run(burst(replicas, model))
        burst_end = time.time()
        time.sleep(IDLE_AFTER_S)
        end = time.time()
        scraped = series(prometheus_url, start, end)
    finally:
        if prometheus is not None:
            prometheus.stop()
        stop_replicas(replicas)
    pods = [r.name for r in replicas]
    complete = [(stamp - start, [values[p] for p in pods]) for stamp, values in scraped if set(values) == set(pods)]
    rows = replay(HPA, len(replicas), complete)
    burst_rows = [r for r in rows if burst_start - start <= r["time_s"] <= burst_end - start]
    return {
        "hpa": {**HPA.__dict__, "current_replicas": len(replicas), "metric": METRIC},
        "max_num_seqs": MAX_NUM_SEQS,
        "burst_requests": BURST,
        "max_tokens": MAX_TOKENS,
        "burst_s": [round(burst_start - start, 2), round(burst_end - start, 2)],
        "failed": sum(not o.ok for o in outcomes),
        "pods": pods,
        "series": [{**r, "time_s": round(r["time_s"], 1)} for r in rows],
        "max_desired_during_burst": max((r["desired"] for r in burst_rows), default=0),
        "final_desired": rows[-1]["desired"] if rows else 0,
    }


def table(result: dict) -> str:
    hpa = result["hpa"]
    lines = [
        f"(c) Prometheus (1 s scrapes) + HPA formula: target {hpa['target']} {hpa['metric']} per pod, tolerance "
        f"{hpa['tolerance']}, replicas {hpa['min_replicas']}..{hpa['max_replicas']}, "
        f"current {hpa['current_replicas']}, "
        f"scale-down window {hpa['scale_down_window_s']:.0f} s (Kubernetes default 300 s); burst of "
        f"{result['burst_requests']} requests at --max-num-seqs {result['max_num_seqs']} from {result['burst_s'][0]} "
        f"to {result['burst_s'][1]} s; failed: {result['failed']}",
        "",
        "| t (s) | " + " | ".join(f"{p} waiting" for p in result["pods"]) + " | average | raw desired | desired |",
        "|---:|" + "---:|" * (len(result["pods"]) + 3),
    ]
    # one row per run of equal seconds (the series has one point a second)
    runs: list[list[dict]] = []
    for row in result["series"]:
        key = (row["per_pod"], row["raw"], row["desired"])
        if runs and (runs[-1][0]["per_pod"], runs[-1][0]["raw"], runs[-1][0]["desired"]) == key:
            runs[-1].append(row)
        else:
            runs.append([row])
    lines += [
        f"| {run[0]['time_s'] + 0.0:.0f}-{run[-1]['time_s']:.0f} | "
        + " | ".join(f"{v:.0f}" for v in run[0]["per_pod"])
        + f" | {run[0]['average']:.1f} | {run[0]['raw']} | {run[0]['desired']} |"
        for run in runs
    ]
    lines.append(
        f"\nmax recommendation during the burst: {result['max_desired_during_burst']}; at the end: "
        f"{result['final_desired']}"
    )
    return "\n".join(lines)


def plot(result: dict, ax) -> None:
    times = [r["time_s"] for r in result["series"]]
    for index, pod in enumerate(result["pods"]):
        ax.step(times, [r["per_pod"][index] for r in result["series"]], where="post", label=f"{pod} waiting")
    ax.axhline(result["hpa"]["target"], color="grey", linestyle=":", label="target per pod")
    ax.axvspan(*result["burst_s"], color="orange", alpha=0.15, label="burst")
    ax.set_xlabel("seconds")
    ax.set_ylabel(result["hpa"]["metric"])
    twin = ax.twinx()
    twin.step(times, [r["desired"] for r in result["series"]], where="post", color="black", label="HPA desired")
    twin.set_ylabel("desired replicas")
    twin.set_ylim(0, result["hpa"]["max_replicas"] + 1)
    ax.legend(loc="upper left", fontsize=7)
    twin.legend(loc="upper right", fontsize=7)
    ax.set_title("(c) queue depth from Prometheus and the HPA recommendation")
