"""`kiln serve` input handling: bad flags or KILN_* values end with one sentence on stderr, exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from server.cli import main
from server.settings import ServerSettings

from .conftest import REPO, free_port


@pytest.mark.parametrize(
    "argv, contains",
    [
        (["serve", "--port", "abc"], "--port"),
        (["serve", "--port", "70000"], "--port"),
        (["serve", "--block-size", "3"], "block_size must be a power of two"),
        (["serve", "--kv-cache-memory", "lots"], "--kv-cache-memory"),
        (["serve", "--dtype", "float8"], "--dtype"),
        (["serve", "--model", "/no/such/model"], "does not exist"),
        (["serve", "--model", "m", "--engine-dir", "."], "not both"),
        (["serve", "--max-num-seqs", "0"], "max_num_seqs"),
        (["serve", "--frobnicate"], "unrecognized arguments"),
        (["serve", "--speculative-method", "medusa"], "--speculative-method"),
        (["serve", "--backend", "trtllm"], "give --engine-dir"),
        (["serve", "--backend", "tpu"], "--backend"),
        (["serve", "--scheduler-policy", "fifo"], "--scheduler-policy"),
        (["serve", "--gpu-memory-fraction", "1.5"], "--gpu-memory-fraction"),
        (["serve", "--speculative-method", "draft"], "needs --speculative-draft"),
        (["serve", "--speculative-draft", "/no/such/draft"], "does not exist"),
        (["serve", "--speculative-method", "ngram", "--num-speculative-tokens", "0"], "--num-speculative-tokens"),
        (["serve", "--speculative-method", "ngram", "--ngram-min", "5", "--ngram-max", "3"], "ngram_min <= ngram_max"),
        ([], "usage"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, contains, capsys):
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert contains in err
    if argv:
        assert len(err.strip().splitlines()) == 1, err


def run_cli(argv: list[str]) -> int:
    """main()'s exit status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def test_env_variable_errors_name_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("KILN_PORT", "not-a-port")
    assert run_cli(["serve"]) == 2
    assert "KILN_PORT" in capsys.readouterr().err


def test_flags_override_environment(monkeypatch):
    monkeypatch.setenv("KILN_PORT", "9001")
    monkeypatch.setenv("KILN_KV_CACHE_MEMORY", "2GiB")
    monkeypatch.setenv("KILN_ENABLE_PREFIX_CACHING", "false")
    settings = ServerSettings(port=9002)
    assert settings.port == 9002
    config = settings.engine_config()
    assert config.kv_cache_memory == 2 * 1024**3
    assert config.enable_prefix_caching is False


def test_engine_dir_must_hold_an_engine(tmp_path):
    with pytest.raises(ValidationError, match="is not a kiln engine directory \\(it has no engine.json\\)"):
        ServerSettings(engine_dir=str(tmp_path))
    (tmp_path / "engine.json").write_text("{}")
    config = ServerSettings(engine_dir=str(tmp_path)).engine_config()
    assert config.engine_dir == str(tmp_path) and config.model is None


def test_console_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--port", "-1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("kiln serve: invalid --port")


def test_model_that_fails_to_load_exits_1(tmp_path):
    (tmp_path / "not-a-model").mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
            "--model",
            str(tmp_path / "not-a-model"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "The model failed to load" in result.stderr and "config.json" in result.stderr
