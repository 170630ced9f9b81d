"""`kiln serve` replicas on loopback ports, started together, stopped with SIGTERM, scraped for kiln:* metrics."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.event_loop import free_port

REPO = Path(__file__).resolve().parents[2]
# Generous: a clean machine converts the model and compiles kiln's kernels first, and the replicas load together
# on two cores.
READY_TIMEOUT_S = 600
_METRIC_LINE = re.compile(r"^(kiln:[a-z0-9_]+)(?:\{[^}]*\})? (\S+)$", re.M)


@dataclass
class Replica:
    name: str
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/v1/health/ready", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def metrics(self) -> dict[str, float]:
        """kiln:* samples by name (the model_name label dropped; kiln's gauges and counters have no other)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {name: float(value) for name, value in _METRIC_LINE.findall(text)}

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def start_replicas(count: int, log_dir: Path, *flags: str) -> list[Replica]:
    """`count` replicas with the same flags, loading in parallel; returns once every one answers ready."""
    log_dir.mkdir(parents=True, exist_ok=True)
    # Only KILN_CACHE_DIR passes through, so that the flags alone configure the replicas (as the tests do).
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_") or k == "KILN_CACHE_DIR"}
    replicas = []
    for index in range(count):
        port = free_port()
        log_path = log_dir / f"replica-{index}-{port}.log"
        command = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *flags]
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        replicas.append(Replica(f"replica-{index}", process, port, log_path))
    deadline = time.monotonic() + READY_TIMEOUT_S
    pending = list(replicas)
    while pending:
        for replica in list(pending):
            if replica.process.poll() is not None:
                stop_replicas(replicas)
                raise RuntimeError(f"{replica.name} exited with {replica.process.returncode}; see {replica.log_path}")
            if replica.ready():
                pending.remove(replica)
        if time.monotonic() > deadline:
            stop_replicas(replicas)
            raise RuntimeError(f"replicas not ready within {READY_TIMEOUT_S} s; see {log_dir}")
        time.sleep(0.5)
    return replicas


def stop_replicas(replicas: list[Replica], timeout: float = 60) -> dict[str, int]:
    """SIGTERM to all, then each one's exit status."""
    for replica in replicas:
        replica.terminate()
    return {replica.name: replica.wait(timeout) for replica in replicas}
