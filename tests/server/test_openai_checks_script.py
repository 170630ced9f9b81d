"""scripts/openai_checks.py against a live kiln server (default model, CPU torch backend): every check
passes, and the table and JSON say so."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from .conftest import CLEAN_EXIT, REPO, start_server

pytestmark = pytest.mark.slow

SCRIPT = REPO / "scripts" / "openai_checks.py"


def check_names() -> list[str]:
    """The script's own list of checks, so a check added there is asserted here too."""
    spec = importlib.util.spec_from_file_location("openai_checks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return [name for name, _ in module.CHECKS]


def table_rows(stdout: str) -> dict[str, str]:
    """check -> PASS/FAIL from the script's first Markdown table."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[1] in ("PASS", "FAIL"):
            rows[cells[0]] = cells[1]
    return rows


def test_every_check_passes_against_the_default_model(tmp_path):
    # An API key on the server makes the script prove it sends it everywhere /v1 needs it.
    server = start_server(tmp_path, api_key="checks-key")
    try:
        result = subprocess.run(
            [
                sys.executable,
                str(SCRIPT),
                "--url",
                server.base_url,
                "--api-key",
                "checks-key",
                "--json",
                str(tmp_path / "checks.json"),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
    finally:
        code = server.stop()
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, report
    rows = table_rows(result.stdout)
    expected = check_names()
    assert set(expected) <= set(rows), report
    assert len(rows) == len(expected) + 1, report  # and the timing row
    assert all(verdict == "PASS" for verdict in rows.values()), report
    assert "| concurrency | requests |" in result.stdout, report

    data = json.loads((tmp_path / "checks.json").read_text())
    assert data["failed"] == 0 and data["passed"] == len(rows)
    assert data["metadata"]["backend"] == "torch"
    assert [(t["concurrency"], t["requests"]) for t in data["timing"]] == [(1, 3), (8, 8)]
    assert all(t["output_tokens"] == t["requests"] * 64 and t["output_tok_per_s"] > 0 for t in data["timing"])
    assert code in CLEAN_EXIT, server.log()
