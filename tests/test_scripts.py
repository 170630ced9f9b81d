"""The device-check scripts, as far as a CPU machine can check them: scripts/gpu-check-trtllm.sh's
syntax, its refusals (no tensorrt_llm, no GPU, a GPU before SM 80), the precision it picks per SM, and
scripts/openai_checks.py's answer when no server listens. Fake `nvidia-smi` and `kiln` commands
and a stub tensorrt_llm module stand in for the TensorRT-LLM image."""

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
# What the script runs besides python; linked into a private bin folder so PATH holds nothing else
# (in particular no real nvidia-smi or kiln, whatever this machine has).
TOOLS = ["bash", "dirname", "head", "tr", "mktemp", "date", "awk", "rm", "sleep", "tail", "cat", "mkdir"]


def fake_bin(tmp_path: Path, nvidia_smi_cap: str | None = None, kiln: str | None = None) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    if nvidia_smi_cap is not None:
        write_exe(
            bin_dir / "nvidia-smi",
            f"""#!{BASH}
case "$*" in
  *compute_cap*) echo "{nvidia_smi_cap}" ;;
  *name*) echo "Fake GPU" ;;
esac
""",
        )
    if kiln is not None:
        write_exe(bin_dir / "kiln", kiln)
    return bin_dir


def write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def stub_tensorrt_llm(tmp_path: Path) -> Path:
    (tmp_path / "stub" / "tensorrt_llm").mkdir(parents=True)
    (tmp_path / "stub" / "tensorrt_llm" / "__init__.py").write_text("")
    return tmp_path / "stub"


def run_gpu_check(
    bin_dir: Path, pythonpath: Path | None = None, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess:
    environ = {
        "PATH": str(bin_dir),
        "PYTHON": sys.executable,
        "HOME": os.environ.get("HOME", "/tmp"),
        "TMPDIR": str(bin_dir.parent),
        **env,
    }
    if pythonpath:
        environ["PYTHONPATH"] = str(pythonpath)
    # Run from elsewhere: the script must find the repository itself.
    return subprocess.run(
        [BASH, str(GPU_CHECK)], capture_output=True, text=True, env=environ, cwd=bin_dir.parent, timeout=timeout
    )


def test_gpu_check_trtllm_syntax():
    result = subprocess.run([BASH, "-n", str(GPU_CHECK)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_gpu_check_trtllm_needs_tensorrt_llm(tmp_path):
    assert subprocess.run([sys.executable, "-c", "import tensorrt_llm"], capture_output=True).returncode != 0, (
        "this python has tensorrt_llm; the refusal cannot be tested here"
    )
    result = run_gpu_check(fake_bin(tmp_path))
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "tensorrt_llm" in lines[0], result.stderr


def test_gpu_check_trtllm_needs_nvidia_smi(tmp_path):
    result = run_gpu_check(fake_bin(tmp_path), stub_tensorrt_llm(tmp_path))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nvidia-smi" in lines[0], result.stderr


def test_gpu_check_trtllm_refuses_before_sm80(tmp_path):
    result = run_gpu_check(fake_bin(tmp_path, nvidia_smi_cap="7.5"), stub_tensorrt_llm(tmp_path))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "SM 75" in lines[0] and "SM >= 80" in lines[0], result.stderr


@pytest.mark.parametrize(
    "cap, precision, kv",
    [
        ("9.0", "fp8", "fp8"),
        ("8.9", "fp8", "fp8"),
        ("8.6", "int8-sq", "int8"),
        ("8.0", "int8-sq", "int8"),
        ("12.0", "fp8", "fp8"),
    ],
)
def test_gpu_check_trtllm_picks_precision_by_sm(tmp_path, cap, precision, kv):
    # A kiln whose build records its arguments and fails: the script must stop there (set -e).
    record = tmp_path / "build-args"
    kiln = f'#!{BASH}\necho "$@" > {record}\nexit 3\n'
    result = run_gpu_check(
        fake_bin(tmp_path, nvidia_smi_cap=cap, kiln=kiln), stub_tensorrt_llm(tmp_path), MODEL="/models/m"
    )
    assert result.returncode == 3, result.stderr
    args = record.read_text().split()
    assert args[:2] == ["build", "--backend"] and args[2] == "trtllm"
    assert args[args.index("--precision") + 1] == precision
    assert args[args.index("--kv-cache-dtype") + 1] == kv
    assert args[args.index("--model") + 1] == "/models/m"
    assert "--output" in args


@pytest.mark.slow
def test_gpu_check_trtllm_whole_run_with_fakes(tmp_path):
    """The whole flow on a CPU: a fake kiln whose `build` writes an empty folder and whose `serve`
    runs the real server on the default model, then the OpenAI checks and the summary table."""
    record = tmp_path / "build-args"
    kiln = f"""#!{BASH}
set -e
if [[ "$1" == build ]]; then
  echo "$@" > {record}
  while [[ $# -gt 0 ]]; do [[ "$1" == --output ]] && mkdir -p "$2"; shift; done
  exit 0
fi
shift  # serve: drop --engine-dir and its value, keep the rest
args=()
while [[ $# -gt 0 ]]; do
  if [[ "$1" == --engine-dir ]]; then shift 2; else args+=("$1"); shift; fi
done
exec {sys.executable} -m server.cli serve "${{args[@]}}"
"""
    port = free_port()
    result = run_gpu_check(
        fake_bin(tmp_path, nvidia_smi_cap="8.9", kiln=kiln), stub_tensorrt_llm(tmp_path), timeout=900, PORT=str(port)
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "--precision fp8 --kv-cache-dtype fp8" in record.read_text()
    summary = result.stdout.strip().splitlines()[-1]
    cells = [c.strip() for c in summary.strip("|").split("|")]
    assert cells[:4] == ["Fake GPU", "89", "fp8", "fp8"], summary
    passed, total = cells[6].split("/")
    assert passed == total and int(total) >= 14, summary
    assert not list(tmp_path.glob("kiln-gpu-check-trtllm.*")), "the work folder stays after a clean run"


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
