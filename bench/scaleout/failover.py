"""Scenario (a): haproxy in front of the replicas; a steady closed-loop client while one replica is SIGTERMed.

haproxy checks /v1/health/ready every 500 ms: after SIGTERM the replica closes its listening socket, so the next
check fails and haproxy marks it down. Until then a new connection to it is refused; `retry-on conn-failure`
with `option redispatch` sends that request to the other replica. `empty-response` covers a request that raced
the replica closing an idle keep-alive connection, and 503 the replica's own "shutting down" answer (only sent if
a request outlives --graceful-shutdown-timeout). Requests already running on the replica finish there within the
grace period. Nothing retried has produced a byte for the client: haproxy only retries before a response starts.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from bench.scaleout import load
from bench.scaleout.launcher import Service, require_binary, start_service
from bench.scaleout.replicas import Replica, free_port, start_replicas, stop_replicas

WORKERS = 4
MAX_TOKENS = 16
BEFORE_S = 5  # load before the SIGTERM, at least, and until each replica has answered MIN_DONE requests
AFTER_S = 5  # load after the SIGTERMed replica has exited, at least, and until the other answered MIN_DONE more
MIN_DONE = 3
PHASE_TIMEOUT_S = 120
GRACE_S = 60
EXIT_TIMEOUT_S = GRACE_S + 30

HAPROXY_CONFIG = """\
global
    maxconn 256

defaults
    mode http
    timeout connect 2s
    timeout client 300s
    timeout server 300s
    timeout queue 60s
    # L7 retries need the whole request in haproxy's buffer (chat bodies here are small)
    option http-buffer-request
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response 503

frontend kiln
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk
    http-check send meth GET uri /v1/health/ready
    http-check expect status 200
    default-server inter 500ms fastinter 250ms downinter 500ms fall 1 rise 2
    http-response set-header {header} %[srv_name]
{servers}
"""


def start_haproxy(replicas: list[Replica], work_dir: Path) -> tuple[Service, str]:
    port = free_port()
    servers = "\n".join(f"    server {r.name} 127.0.0.1:{r.port} check" for r in replicas)
    config = work_dir / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(port=port, header=load.REPLICA_HEADER, servers=servers))
    url = f"http://127.0.0.1:{port}"
    command = [require_binary("haproxy"), "-db", "-f", str(config)]
    return start_service("haproxy", command, work_dir / "haproxy.log", f"{url}/v1/health/ready"), url


def prompt(index: int) -> list[dict]:
    return [{"role": "user", "content": f"Count from 1 to {3 + index % 10}, one number per line."}]


async def until(enough, minimum_s: float) -> None:
    """At least `minimum_s`, then until enough() holds (at most PHASE_TIMEOUT_S in all)."""
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    await asyncio.sleep(minimum_s)
    while not enough() and time.monotonic() < deadline:
        await asyncio.sleep(0.2)


async def drive(proxy_url: str, model: str, replicas: list[Replica]) -> dict:
    victim, survivor = replicas
    api = load.client(proxy_url)
    stop = asyncio.Event()
    done: list[load.Outcome] = []  # as they finish, for the phases below to count

    async def call(index: int) -> load.Outcome:
        outcome = await load.chat(api, model, prompt(index), MAX_TOKENS, stream=index % 2 == 0)
        done.append(outcome)
        return outcome

    def served(replica: Replica, since: float = 0.0) -> int:
        return sum(o.ok and o.replica == replica.name and o.finished >= since for o in done)

    async def schedule() -> dict:
        # phases end on completions, not only on time: a loaded machine may need long for a few requests
        await until(lambda: min(served(r) for r in replicas) >= MIN_DONE, BEFORE_S)
        sigterm_at = time.monotonic()
        victim.terminate()
        code = await asyncio.to_thread(victim.wait, EXIT_TIMEOUT_S)
        exited_at = time.monotonic()
        await until(lambda: served(survivor, exited_at) >= MIN_DONE, AFTER_S)
        stop.set()
        return {"sigterm_at": sigterm_at, "exited_at": exited_at, "exit_code": code}

    started = time.monotonic()
    outcomes, events = await asyncio.gather(load.closed_loop(WORKERS, call, stop), schedule())
    await api.close()
    return {"started": started, "outcomes": outcomes, **events}


def summarize(run: dict, replicas: list[Replica]) -> dict:
    start, sigterm_at = run["started"], run["sigterm_at"]
    rows = []
    for replica in replicas:
        done = [o for o in run["outcomes"] if o.ok and o.replica == replica.name]
        rows.append(
            {
                "replica": replica.name,
                "before_sigterm": sum(o.finished < sigterm_at for o in done),
                # finished after the SIGTERM: on the victim these are requests its grace period let finish
                "after_sigterm": sum(o.finished >= sigterm_at for o in done),
            }
        )
    failures = [o for o in run["outcomes"] if not o.ok]
    return {
        "workers": WORKERS,
        "max_tokens": MAX_TOKENS,
        "victim": replicas[0].name,
        "sigterm_s": round(sigterm_at - start, 2),
        "victim_exited_s": round(run["exited_at"] - start, 2),
        "victim_exit_code": run["exit_code"],
        "duration_s": round(max(o.finished for o in run["outcomes"]) - start, 2),
        "requests": len(run["outcomes"]),
        "streamed": sum(o.stream for o in run["outcomes"]),
        "failed": len(failures),
        "failure_examples": [o.error for o in failures[:5]],
        "unattributed": sum(o.ok and o.replica is None for o in run["outcomes"]),
        "per_replica": rows,
        # (seconds from start, replica) of every completed request, for the plot
        "completions": [(round(o.finished - start, 3), o.replica) for o in run["outcomes"] if o.ok],
    }


def run(work_dir: Path, log_dir: Path) -> dict:
    replicas = start_replicas(2, log_dir / "failover", "--graceful-shutdown-timeout", str(GRACE_S))
    haproxy = None
    try:
        model = httpx.get(f"{replicas[0].url}/v1/models", timeout=10).json()["data"][0]["id"]
        haproxy, proxy_url = start_haproxy(replicas, work_dir)
        result = asyncio.run(drive(proxy_url, model, replicas))
        return summarize(result, replicas)
    finally:
        if haproxy is not None:
            haproxy.stop()
        stop_replicas(replicas)


def table(result: dict) -> str:
    lines = [
        f"(a) haproxy failover: {result['requests']} requests ({result['streamed']} streamed), {result['workers']} "
        f"workers; SIGTERM to {result['victim']} at {result['sigterm_s']} s, exited {result['victim_exit_code']} at "
        f"{result['victim_exited_s']} s; failed requests: {result['failed']}",
        "",
        "| replica | done before SIGTERM | done after SIGTERM |",
        "|---|---:|---:|",
    ]
    lines += [f"| {r['replica']} | {r['before_sigterm']} | {r['after_sigterm']} |" for r in result["per_replica"]]
    return "\n".join(lines)


def plot(result: dict, ax) -> None:
    names = [r["replica"] for r in result["per_replica"]]
    for row, name in enumerate(names):
        times = [t for t, replica in result["completions"] if replica == name]
        ax.scatter(times, [row] * len(times), s=12, label=name)
    ax.axvline(result["sigterm_s"], color="red", linestyle="--", label="SIGTERM")
    ax.axvline(result["victim_exited_s"], color="grey", linestyle=":", label="victim exited")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("seconds")
    ax.set_title(f"(a) completions through haproxy; failed: {result['failed']}")
    ax.legend(fontsize=7)
