"""scripts/trtllm_checks.py (what scripts/gpu-check-trtllm.sh runs against a TensorRT-LLM engine) against a live
kiln server of the default model on the CPU: every check passes on kiln's torch engine, so on a GPU a failure is the
TensorRT-LLM path's; and a check whose expectation does not hold fails (the refused-logprobs check, here)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from .conftest import CLEAN_EXIT, REPO, start_server

pytestmark = pytest.mark.slow

SCRIPTS = REPO / "scripts"
SCRIPT = SCRIPTS / "trtllm_checks.py"


def check_labels() -> list[str]:
    """The script's own checks, so a check added there is asserted here too."""
    sys.path.insert(0, str(SCRIPTS))  # the script imports its helpers from openai_checks, beside it
    try:
        spec = importlib.util.spec_from_file_location("trtllm_checks", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules.setdefault(spec.name, module)  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPTS))
    return [label for label, _ in module.CHECKS.values()]


def rows(stdout: str) -> dict[str, str]:
    """check -> PASS/FAIL from the script's table (check | result | figure)."""
    out = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1] in ("PASS", "FAIL"):
            out[cells[0]] = cells[1]
    return out


def run_script(tmp_path, url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--url", url, "--api-key", "checks-key", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )


def test_every_check_passes_on_the_cpu_engine_and_a_wrong_expectation_fails(tmp_path):
    labels = check_labels()
    server = start_server(tmp_path, api_key="checks-key")
    try:
        passing = run_script(tmp_path, server.base_url, "--json", str(tmp_path / "checks.json"))
        refused = run_script(tmp_path, server.base_url, "--only", "logprobs", "--logprobs", "refused")
    finally:
        code = server.stop()
    report = f"stdout:\n{passing.stdout}\nstderr:\n{passing.stderr}"
    assert passing.returncode == 0, report
    table = rows(passing.stdout)
    assert list(table) == labels and set(table.values()) == {"PASS"}, report
    data = json.loads((tmp_path / "checks.json").read_text())
    assert data["failed"] == 0 and [c["check"] for c in data["checks"]] == labels
    figures = {c["check"]: c["detail"] for c in data["checks"]}
    assert "40 of 40 with ignore_eos" in figures["ignore_eos to max_tokens"]
    assert int(figures["prompt > 1024 tokens"].split()[0]) > 1024

    # kiln's torch engine serves logprobs, so the check that expects them refused must fail, and say why
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert rows(refused.stdout) == {"logprobs refused without --gather-logits": "FAIL"}
    assert "HTTP 200, expected 400" in refused.stdout
    assert code in CLEAN_EXIT, server.log()


def test_an_unknown_check_is_a_usage_error(tmp_path):
    result = run_script(tmp_path, "http://127.0.0.1:9", "--only", "stream,warp")
    assert result.returncode == 2 and "unknown checks ['warp']" in result.stderr
