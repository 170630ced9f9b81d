"""The device-check scripts, as far as a CPU machine can check them: scripts/gpu-check-trtllm.sh's syntax, its
refusals (no docker, no image) and its whole flow against a stand-in for the docker CLI (tests/gpu_check_fake_docker.py:
kiln's real server and check scripts, the build played), and scripts/openai_checks.py's answer when no server
listens."""

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
FAKE_DOCKER = REPO / "tests" / "gpu_check_fake_docker.py"
BASH = shutil.which("bash")
# What the script runs besides docker; linked into a private bin folder so PATH holds nothing else
# (in particular no real docker, whatever this machine has).
TOOLS = ["bash", "dirname", "mktemp", "chmod", "tr", "cut", "tail", "grep", "sed", "cat", "rm", "sleep"]


def fake_bin(tmp_path: Path, docker: bool) -> Path:
    bin_dir = tmp_path / ("bin" if docker else "bin-without-docker")
    bin_dir.mkdir()
    for tool in TOOLS:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    if docker:
        (bin_dir / "docker").write_text(f'#!{BASH}\nexec {sys.executable} {FAKE_DOCKER} "$@"\n')
        (bin_dir / "docker").chmod(0o755)
    return bin_dir


def run_gpu_check(bin_dir: Path, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    environ = {
        "PATH": str(bin_dir),
        "HOME": os.environ.get("HOME", "/tmp"),
        "TMPDIR": str(bin_dir.parent),
        "FAKE_DOCKER_STATE": str(bin_dir.parent / "docker-state"),
        **{k: v for k, v in os.environ.items() if k in ("KILN_CACHE_DIR", "TORCH_EXTENSIONS_DIR")},
        **env,
    }
    # Run from elsewhere: the script must find the repository itself.
    return subprocess.run(
        [BASH, str(GPU_CHECK)], capture_output=True, text=True, env=environ, cwd=bin_dir.parent, timeout=timeout
    )


def test_gpu_check_trtllm_syntax():
    result = subprocess.run([BASH, "-n", str(GPU_CHECK)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_gpu_check_trtllm_runs_on_the_docker_host_with_the_image(tmp_path):
    result = run_gpu_check(fake_bin(tmp_path, docker=False))
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "docker is not on PATH" in lines[0], result.stderr
    result = run_gpu_check(fake_bin(tmp_path, docker=True), FAKE_DOCKER_NO_IMAGE="1")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "gpu-check-trtllm: no image kiln-trtllm; build it first: docker build -f docker/Dockerfile.trtllm "
        "-t kiln-trtllm ."
    ], result.stderr


@pytest.mark.slow
def test_gpu_check_trtllm_whole_flow_with_a_fake_docker(tmp_path):
    """Every step and the one table, on a CPU: the torch engine behind both `kiln serve`s passes every HTTP check but
    the one that expects an engine built without --gather-logits to refuse logprobs, so exactly that row fails."""
    bin_dir = fake_bin(tmp_path, docker=True)
    (tmp_path / "docker-state").mkdir()
    result = run_gpu_check(bin_dir, timeout=1200, PORT=str(free_port()))
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 1, report
    table = {}
    for line in result.stdout[result.stdout.index("| check | result | figure |") :].splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3:
            table[cells[0]] = cells[1]
    failed = {check for check, verdict in table.items() if verdict != "PASS"}
    assert failed == {"default engine: logprobs refused without --gather-logits"}, report
    steps = ["image ENV and entrypoint", "import without a shell", "refuse int4-gptq", "refuse int8-wo + fp8 KV"]
    steps += ["build, default profile", "build --gather-logits", "serve default", "serve logits"]
    assert set(steps) <= set(table), report
    assert "default engine: stats while streaming" in table and "logits engine: logprobs" in table, report
    assert sum(check.startswith("openai_checks: ") for check in table) >= 14, report
    assert f"{len(table) - 1}/{len(table)} passed" in result.stdout, report
    assert list(tmp_path.glob("kiln-gpu-check-*")), "a failed run keeps its logs"


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
        # KILN_MALLOC_TUNING is read by the engine itself (engines/torch/host_malloc.py), not a flag
        unknown = passed - settings[command[0]] - {"KILN_MALLOC_TUNING"}
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
