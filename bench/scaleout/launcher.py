"""The third-party processes in front of or beside the replicas (haproxy, vllm-router, Prometheus): found on the
machine or refused with the command that installs them, started with a log, ready once an URL answers 200."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

READY_TIMEOUT_S = 120
INSTALL_HINT = "run `make test-scaleout` (it installs haproxy and prometheus with apt-get, vllm-router from PyPI)"


def require_binary(name: str) -> str:
    """The executable's path: the interpreter's own bin/ first (a venv's console scripts), then PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed: {INSTALL_HINT}")
    return found


@dataclass
class Service:
    name: str
    process: subprocess.Popen
    log_path: Path

    def stop(self, timeout: float = 20) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_service(name: str, command: list[str], log_path: Path, ready_url: str) -> Service:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    service = Service(name, process, log_path)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}; see {log_path}:\n{log_path.read_text()}")
        try:
            if httpx.get(ready_url, timeout=5).status_code == 200:
                return service
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    service.stop()
    raise RuntimeError(f"{name} did not answer {ready_url} within {READY_TIMEOUT_S} s; see {log_path}")
