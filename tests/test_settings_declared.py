"""One declaration per setting: `kiln serve`'s flags are generated from `ServerSettings`, and README's settings
table and .env.example list every setting (and, beyond kiln serve's, only variables something reads)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from engines.cli import BUILD_ENV_FLAGS
from server.cli import build_parser
from server.settings import ServerSettings

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ServerSettings.model_fields
VARIABLES = {f"KILN_{name.upper()}" for name in SETTINGS}


def serve_parser() -> argparse.ArgumentParser:
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices["serve"]


def test_every_setting_is_a_serve_flag_with_its_description_as_help():
    actions = {action.dest: action for action in serve_parser()._actions if action.dest != "help"}
    assert set(actions) == set(SETTINGS)
    for name, field in SETTINGS.items():
        assert field.description, f"ServerSettings.{name} has no description (it is the flag's help)"
        flag = f"--{name.replace('_', '-')}"
        wanted = [flag, f"--no-{flag[2:]}"] if field.annotation is bool else [flag]
        assert actions[name].option_strings == wanted and actions[name].help == field.description


def settings_from(argv: list[str]) -> ServerSettings:
    args = vars(serve_parser().parse_args(argv))
    args.pop("handler")
    return ServerSettings(**args)


def test_flags_win_over_environment_and_environment_over_defaults(monkeypatch):
    assert settings_from([]).port == 8000 and settings_from([]).enable_prefix_caching
    monkeypatch.setenv("KILN_PORT", "9001")
    monkeypatch.setenv("KILN_ENABLE_PREFIX_CACHING", "false")
    assert settings_from([]).port == 9001 and not settings_from([]).enable_prefix_caching
    flagged = settings_from(["--port", "9002", "--enable-prefix-caching"])
    assert flagged.port == 9002 and flagged.enable_prefix_caching


def test_settings_are_immutable():
    with pytest.raises(Exception, match="frozen"):
        ServerSettings().port = 1


def test_readme_settings_table_lists_every_setting_and_nothing_else():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Running `kiln serve`") :]
    section = section[: section.index("\n## ")]
    flags, variables = set(), set()
    for row in (line for line in section.splitlines() if line.startswith("| `--")):
        flag_cell, variable_cell = row.split("|")[1:3]
        flags |= {f for f in re.findall(r"`(--[a-z-]+)`", flag_cell) if not f.startswith("--no-")}
        variables |= set(re.findall(r"KILN_[A-Z_]+", variable_cell))
    assert flags == {f"--{name.replace('_', '-')}" for name in SETTINGS}
    assert variables == VARIABLES


def test_env_example_lists_every_setting_and_only_variables_something_reads():
    listed = set(re.findall(r"^#?\s*(KILN_[A-Z_]+)=", (REPO / ".env.example").read_text(), re.MULTILINE))
    assert VARIABLES <= listed, f".env.example lacks {sorted(VARIABLES - listed)}"
    build = {f"KILN_{flag.upper()}" for flag in BUILD_ENV_FLAGS}
    compose = set(re.findall(r"\$\{(KILN_[A-Z_]+)", "".join(p.read_text() for p in REPO.glob("compose*.yaml"))))
    code = "".join(p.read_text() for folder in ("engines", "server") for p in (REPO / folder).rglob("*.py"))
    read_by_code = {v for v in listed if f'"{v}"' in code}
    unknown = listed - VARIABLES - build - compose - read_by_code
    assert not unknown, f".env.example lists {sorted(unknown)}, which nothing reads"
