"""The built wheel is a complete kiln: built from this checkout, installed into a fresh virtual environment and
run from a folder outside the repository, `kiln profiles` finds the shipped profiles and `kiln serve` answers a
chat completion with the default model. `make test-wheel` runs it (`make test` leaves tests/wheel out, see
norecursedirs).

To stay at a few minutes, the fresh environment does not reinstall kiln's dependencies (torch alone is
gigabytes): a .pth file adds the site-packages of the Python running this test behind the venv's own. A .pth
file's path lines do not process the .pth files found there, so an editable kiln installed in that
environment stays out of sys.path, and the test checks that kiln's modules and data come from the wheel."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
LOAD_TIMEOUT_S = 600  # a clean CI machine converts the GGUF model first

pytestmark = pytest.mark.wheel


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} exited with {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(the fresh venv, the environment to run its commands in)"""
    work = tmp_path_factory.mktemp("wheel")
    # no PYTHONPATH (it could point at the checkout) and no KILN_* but the model cache
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "PYTHONPATH" and (not k.startswith("KILN_") or k == "KILN_CACHE_DIR")
    }
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(work / "dist"), str(REPO)],
        work,
        env,
    )
    (wheel,) = (work / "dist").glob("kiln-*.whl")
    venv = work / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], work, env)
    python = venv / "bin" / "python"
    purelib = Path(
        run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], work, env).stdout.strip()
    )
    (purelib / "zz_kiln_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet", str(wheel)], work, env
    )
    return venv, env


def test_the_wheel_carries_kiln_and_its_data(wheel_venv):
    venv, env = wheel_venv
    probe = (
        "import engines, server; from engines.profiles import PROFILES_DIR; "
        "from engines.calibration import CALIBRATION_DIR; "
        "print(engines.__file__, server.__file__, PROFILES_DIR, CALIBRATION_DIR, sep='\\n')"
    )
    paths = run([str(venv / "bin" / "python"), "-c", probe], venv.parent, env).stdout.split()
    for path in paths:
        assert Path(path).resolve().is_relative_to(venv.resolve()), f"{path} is not from the wheel"
    profiles, calibration = Path(paths[2]), Path(paths[3])
    assert {p.name for p in profiles.glob("*.toml")} == {p.name for p in (REPO / "build" / "profiles").glob("*.toml")}
    assert {p.name for p in calibration.glob("*.jsonl")} == {"calib.jsonl", "eval.jsonl"}


def test_kiln_profiles_from_the_wheel(wheel_venv):
    venv, env = wheel_venv
    out = run([str(venv / "bin" / "kiln"), "profiles"], venv.parent, env).stdout
    assert "This machine:" in out and "cpu-int8" in out and "--precision auto picks" in out


def test_kiln_serve_from_the_wheel_answers_a_chat_completion(wheel_venv):
    venv, env = wheel_venv
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log_path = venv.parent / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(venv / "bin" / "kiln"), "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=venv.parent,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            deadline = time.monotonic() + LOAD_TIMEOUT_S
            while True:
                assert process.poll() is None, f"kiln serve exited:\n{log_path.read_text()}"
                assert time.monotonic() < deadline, f"kiln serve not ready:\n{log_path.read_text()}"
                try:
                    if client.get("/v1/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            answer = client.post(
                "/v1/chat/completions",
                json={
                    "model": client.get("/v1/models").json()["data"][0]["id"],
                    "max_tokens": 8,
                    "temperature": 0,
                    "messages": [{"role": "user", "content": "Say hello."}],
                },
            )
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
