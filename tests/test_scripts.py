"""The device-check scripts, as far as a CPU machine can check them: scripts/gpu-check-trtllm.sh's syntax and its
refusal where there is no docker (its HTTP checks, scripts/trtllm_checks.py, run against a live CPU server in
tests/server/test_trtllm_checks_script.py; the rest needs a GPU host with the TensorRT-LLM image), and
scripts/openai_checks.py's answer when no server listens."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU_CHECK = REPO / "scripts" / "gpu-check-trtllm.sh"
OPENAI_CHECKS = REPO / "scripts" / "openai_checks.py"
BASH = shutil.which("bash")
# What the script runs besides docker; linked into a private bin folder so PATH holds nothing else
# (in particular no docker, whatever this machine has).
TOOLS = ["bash", "dirname", "mktemp", "chmod", "tr", "cut", "tail", "grep", "sed", "cat", "rm", "sleep"]


def test_gpu_check_trtllm_syntax():
    result = subprocess.run([BASH, "-n", str(GPU_CHECK)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_gpu_check_trtllm_needs_docker_on_the_host(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    environ = {"PATH": str(bin_dir), "HOME": os.environ.get("HOME", "/tmp"), "TMPDIR": str(tmp_path)}
    # run from elsewhere: the script must find the repository itself
    result = subprocess.run([BASH, str(GPU_CHECK)], capture_output=True, text=True, env=environ, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "docker is not on PATH" in lines[0], result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_openai_checks_without_a_server(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # bound and released: nothing listens there now
    result = subprocess.run(
        [sys.executable, str(OPENAI_CHECKS), "--url", url, "--json", str(tmp_path / "out.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"no server answers at {url}" in lines[0], result.stderr
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("compose_file", ["compose.yaml", "compose.gpu.yaml"])
def test_compose_commands_and_settings_are_kilns(compose_file):
    """What a compose file hands kiln must be something kiln takes (its structure is the file's own business;
    compose.yaml runs end to end in `make test-docker`): the Dockerfile it builds exists, each service's
    command parses as a kiln command, and each KILN_* variable it passes is a setting of that command."""
    import yaml

    from engines.cli import BUILD_ENV_FLAGS
    from server.cli import build_parser
    from server.settings import ServerSettings

    compose = yaml.safe_load((REPO / compose_file).read_text())
    settings = {
        "build": {f"KILN_{flag.upper()}" for flag in BUILD_ENV_FLAGS},
        "serve": {f"KILN_{name.upper()}" for name in ServerSettings.model_fields},
    }
    for name, service in compose["services"].items():
        dockerfile = service.get("build", {}).get("dockerfile")
        if dockerfile:
            assert (REPO / dockerfile).is_file(), f"{compose_file} {name}: {dockerfile} does not exist"
        command = [arg.replace("${KILN_BUILD_BACKEND:-trtllm}", "trtllm") for arg in service["command"]]
        build_parser().parse_args(command)  # exits 2 on a flag kiln does not have
        passed = {variable.split("=")[0] for variable in service.get("environment", [])}
        # read by the engine itself, not flags: KILN_MALLOC_TUNING (engines/torch/host_malloc.py) and KILN_CPU_ISA
        # (engines/cpu_isa.py, which every kiln command reads)
        unknown = passed - settings[command[0]] - {"KILN_MALLOC_TUNING", "KILN_CPU_ISA"}
        assert not unknown, f"{compose_file} {name} passes {sorted(unknown)}, which `kiln {command[0]}` does not read"


def test_gpu_bench_8b_dry_run_on_cpu():
    """scripts/gpu_bench_8b.py end to end with a tiny model on the CPU: one table, bf16 and fp8 at batch 1
    and 64, every figure positive, FP8 storing fewer weight bytes."""
    flags = [
        "--device",
        "cpu",
        "--layers",
        "2",
        "--hidden",
        "256",
        "--intermediate",
        "512",
        "--vocab",
        "1000",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--prompt",
        "32",
        "--steps",
        "8",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "scripts.gpu_bench_8b", *flags], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| precision | batch | decode tok/s | ms per step | weight GB | achieved GB/s |")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert [r[:2] for r in rows] == [["bf16", "1"], ["bf16", "64"], ["fp8", "1"], ["fp8", "64"]], result.stdout
    assert all(float(c) > 0 for r in rows for c in r[1:]), result.stdout
    assert float(rows[2][4]) < float(rows[0][4])  # FP8 weights: fewer bytes than bf16
