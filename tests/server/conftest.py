"""Fixtures of the server tests: a live `kiln serve` on a free loopback port with the default model
(started once per session), clients for it (the official openai SDK and raw httpx), and helpers."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
API_KEY = "kiln-test-key"
LOAD_TIMEOUT_S = 600  # a clean CI machine converts the GGUF model first
CLEAN_EXIT = (0,)  # SIGTERM ends `kiln serve` with status 0 once the shutdown is complete


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    """A `kiln serve` subprocess and what was seen while it loaded."""

    process: subprocess.Popen
    base_url: str
    api_key: str | None
    log_path: Path
    # (live status, ready status) pairs polled while the model loaded
    load_observations: list[tuple[int, int]] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def start_server(
    tmp_path: Path,
    *args: str,
    api_key: str | None = None,
    module: str = "server.cli",
    env: dict[str, str] | None = None,
) -> LiveServer:
    """`python -m <module> serve ...` (a module that wraps kiln's CLI can inject faults); `env` adds variables to
    the test's environment, of which no other KILN_* variable reaches the server."""
    port = free_port()
    log_path = tmp_path / f"kiln-serve-{port}.log"
    command = [sys.executable, "-m", module, "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    if api_key:
        command += ["--api-key", api_key]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_") or k == "KILN_CACHE_DIR"} | (env or {})
    log_file = open(log_path, "w")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    server = LiveServer(process, f"http://127.0.0.1:{port}", api_key, log_path)
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    with httpx.Client(base_url=server.base_url, timeout=5) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"kiln serve exited with {process.returncode}:\n{server.log()}")
            try:
                live = client.get("/v1/health/live").status_code
                ready = client.get("/v1/health/ready").status_code
            except httpx.TransportError:
                time.sleep(0.2)
                continue
            server.load_observations.append((live, ready))
            if ready == 200:
                return server
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"kiln serve was not ready within {LOAD_TIMEOUT_S} s:\n{server.log()}")


@pytest.fixture(scope="session")
def live_server(tmp_path_factory) -> LiveServer:
    """The shared server: default model, an API key, everything else default."""
    server = start_server(tmp_path_factory.mktemp("server"), api_key=API_KEY)
    yield server
    code = server.stop()
    assert code in CLEAN_EXIT, f"kiln serve exited with {code} after SIGTERM:\n{server.log()}"


@pytest.fixture(scope="session")
def http(live_server) -> httpx.Client:
    with httpx.Client(base_url=live_server.base_url, headers=live_server.headers, timeout=300) as client:
        yield client


@pytest.fixture(scope="session")
def openai_client(live_server):
    from openai import OpenAI

    client = OpenAI(
        base_url=f"{live_server.base_url}/v1",
        api_key=live_server.api_key,
        max_retries=0,
        timeout=300,
        _strict_response_validation=True,
    )
    yield client
    client.close()


@pytest.fixture(scope="session")
def async_openai_factory(live_server):
    from openai import AsyncOpenAI

    def make() -> AsyncOpenAI:
        return AsyncOpenAI(
            base_url=f"{live_server.base_url}/v1",
            api_key=live_server.api_key,
            max_retries=0,
            timeout=300,
            _strict_response_validation=True,
        )

    return make


@pytest.fixture(scope="session")
def model_name(http) -> str:
    return http.get("/v1/models").json()["data"][0]["id"]


# ---- helpers ------------------------------------------------------------------------------------
def sse_events(source: httpx.Response | Iterator[str]) -> list[dict | str]:
    """The `data:` payloads of an SSE response (or of the rest of its lines), JSON-decoded except "[DONE]"."""
    events = []
    for line in source.iter_lines() if isinstance(source, httpx.Response) else source:
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


_METRIC_LINE = re.compile(r"^(kiln:[a-z0-9_]+)(?:\{([^}]*)\})? (\S+)$", re.M)


def scrape(client: httpx.Client) -> dict[str, float]:
    """kiln:* samples of /metrics as {name or name{labels}: value}; unlabelled-by-reason names are
    keyed by name alone (the model_name label is dropped)."""
    text = client.get("/metrics").text
    samples = {}
    for name, labels, value in _METRIC_LINE.findall(text):
        extra = ",".join(part for part in labels.split(",") if part and not part.startswith("model_name="))
        samples[f"{name}{{{extra}}}" if extra else name] = float(value)
    return samples


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def assert_error(response: httpx.Response, status: int, *, contains: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    if contains is not None:
        assert contains in error["message"], error
    return error
