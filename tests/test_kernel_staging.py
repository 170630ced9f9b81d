"""Kernel sources are compiled from a copy staged by content (engines/torch/kernels/extension.py
`stage_sources`): the same sources installed at another path (a wheel in another venv, an image) reuse the
kernel already built instead of compiling it again, and a changed source or shared header is rebuilt."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engines.torch.kernels import extension
from engines.torch.kernels.extension import stage_sources

REPO = Path(__file__).resolve().parents[1]
PROBE = """
#include <torch/extension.h>
#include "kiln_bf16.h"
int answer() { return 42; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", &answer); }
"""


@pytest.fixture
def extensions_dir(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    return root


def write_probe(folder: Path) -> Path:
    folder.mkdir(parents=True)
    source = folder / "probe.cpp"
    source.write_text(PROBE)
    return source


def test_identical_sources_at_two_paths_stage_to_one_folder_written_once(tmp_path, extensions_dir):
    first = stage_sources(write_probe(tmp_path / "install-a"))
    mtime = first.stat().st_mtime_ns
    second = stage_sources(write_probe(tmp_path / "install-b"))
    assert first == second and first.is_relative_to(extensions_dir)
    assert first.read_text() == PROBE and (first.parent / "kiln_bf16.h").is_file()
    assert first.stat().st_mtime_ns == mtime, "a staged file was rewritten: ninja would rebuild from it"
    assert [p.name for p in first.parent.parent.iterdir()] == [first.parent.name], "a staging folder was left"


def test_a_changed_source_or_shared_header_stages_elsewhere(tmp_path, extensions_dir, monkeypatch):
    staged = stage_sources(write_probe(tmp_path / "a"))
    changed = write_probe(tmp_path / "b")
    changed.write_text(PROBE + "// edited\n")
    assert stage_sources(changed).parent != staged.parent
    headers = tmp_path / "headers"
    headers.mkdir()
    (headers / "kiln_bf16.h").write_text((extension.HEADERS_DIR / "kiln_bf16.h").read_text() + "// edited\n")
    monkeypatch.setattr(extension, "HEADERS_DIR", headers)
    assert stage_sources(write_probe(tmp_path / "c")).parent != staged.parent


LOAD = """
import sys
from pathlib import Path
from engines.torch.kernels.extension import LazyExtension
module = LazyExtension("kiln_test_staging_probe", Path(sys.argv[1]), ["-O0"]).get()
assert module is not None and module.answer() == 42
"""


def test_a_kernel_built_from_one_install_path_is_reused_from_another(tmp_path, extensions_dir):
    """Two processes (torch's in-process version cache plays no part), the probe's source at two paths: the
    second loads the first one's library without compiling (its build output keeps its time)."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions_dir)}

    def load_from(folder: str) -> None:
        source = write_probe(tmp_path / folder)
        result = subprocess.run(
            [sys.executable, "-c", LOAD, str(source)], cwd=REPO, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr

    load_from("install-a")
    (library,) = extensions_dir.rglob("kiln_test_staging_probe*.so")
    built = library.stat().st_mtime_ns
    load_from("install-b")
    assert [p.stat().st_mtime_ns for p in extensions_dir.rglob("kiln_test_staging_probe*.so")] == [built]
