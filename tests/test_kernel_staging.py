"""Kernel sources are compiled from a copy staged by content (engines/torch/kernels/extension.py
`stage_sources`): the same sources installed at another path (a wheel in another venv, an image) and built
kernels copied to another TORCH_EXTENSIONS_DIR (the Helm chart's seeded cache) load without compiling again;
a changed source or shared header is rebuilt."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engines.torch.kernels import extension
from engines.torch.kernels.extension import STAGED_MTIME, stage_sources

REPO = Path(__file__).resolve().parents[1]
PROBE = """
#include "kiln_torch.h"
#include "kiln_bf16.h"
int answer() { return 42; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", &answer); }
"""


@pytest.fixture
def staging(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "staged"
    monkeypatch.setattr(extension, "staging_root", lambda: root)
    return root


def write_probe(folder: Path, text: str = PROBE) -> Path:
    folder.mkdir(parents=True)
    source = folder / "probe.cpp"
    source.write_text(text)
    return source


def test_identical_sources_at_two_paths_stage_to_one_folder_with_a_fixed_time(tmp_path, staging):
    first = stage_sources(write_probe(tmp_path / "install-a"))
    second = stage_sources(write_probe(tmp_path / "install-b"))
    assert first == second and first.parent.parent == staging
    assert first.read_text() == PROBE and (first.parent / "kiln_bf16.h").is_file()
    assert {p.stat().st_mtime for p in first.parent.iterdir()} == {STAGED_MTIME}
    assert [p.name for p in staging.iterdir()] == [first.parent.name], "a scratch folder was left behind"


def test_a_partly_removed_staging_folder_is_written_again(tmp_path, staging):
    staged = stage_sources(write_probe(tmp_path / "a"))
    (staged.parent / "kiln_bf16.h").unlink()  # as a temporary-file cleaner might
    assert stage_sources(write_probe(tmp_path / "b")) == staged
    assert (staged.parent / "kiln_bf16.h").stat().st_mtime == STAGED_MTIME


def test_a_changed_source_or_shared_header_stages_elsewhere(tmp_path, staging, monkeypatch):
    staged = stage_sources(write_probe(tmp_path / "a"))
    assert stage_sources(write_probe(tmp_path / "b", PROBE + "// edited\n")).parent != staged.parent
    headers = tmp_path / "headers"
    headers.mkdir()
    (headers / "kiln_bf16.h").write_text((extension.HEADERS_DIR / "kiln_bf16.h").read_text() + "// edited\n")
    monkeypatch.setattr(extension, "HEADERS_DIR", headers)
    assert stage_sources(write_probe(tmp_path / "c")).parent != staged.parent


def test_sources_that_cannot_be_staged_compile_in_place(tmp_path, monkeypatch):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setattr(extension, "staging_root", lambda: blocked / "kiln-kernel-sources")
    source = write_probe(tmp_path / "a")
    assert stage_sources(source) == source


LOAD = """
import sys
from pathlib import Path
from engines.torch.kernels.extension import LazyExtension
module = LazyExtension("kiln_test_staging_probe", Path(sys.argv[1]), ["-O0"]).get()
assert module is not None and module.answer() == 42
"""


def test_a_built_kernel_is_reused_from_another_install_path_and_another_extensions_dir(tmp_path):
    """Separate processes (torch's in-process version cache plays no part). The probe is built once from
    one install path; loading it from a second path, then from a copy of the extensions folder made as the
    chart's seed makes it (`cp -a`), leaves the built library as it was."""
    temp = tmp_path / "tmp"  # the staging folder's parent, private to this test
    temp.mkdir()

    def load(install: str, extensions: Path) -> list[int]:
        source = write_probe(tmp_path / install)
        env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "TMPDIR": str(temp)}
        result = subprocess.run(
            [sys.executable, "-c", LOAD, str(source)], cwd=REPO, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        return [p.stat().st_mtime_ns for p in extensions.rglob("kiln_test_staging_probe*.so")]

    image = tmp_path / "image-extensions"
    built = load("install-a", image)
    assert len(built) == 1
    assert load("install-b", image) == built
    pod = tmp_path / "pod-extensions"
    shutil.copytree(image, pod, copy_function=shutil.copy2)  # cp -a keeps times
    assert load("install-c", pod) == built


def test_loading_an_extension_again_after_a_reset_is_no_new_build():
    """Tests switch KILN_CPU_ISA and reset() many times in one process: each later load of a kernel must find the
    build it made, not a new version to compile (torch appended its libraries to the flags kiln passed, which made
    torch's versioner see new build arguments every time)."""
    from torch.utils.cpp_extension import JIT_EXTENSION_VERSIONER

    from engines.torch.kernels import rms_norm

    if not rms_norm.available():
        pytest.skip("no compiler or CPU for kiln's rms_norm kernel here")
    loaded = [e for e in extension.EXTENSIONS if e.module is not None and e.owner.endswith(".rms_norm")]
    flags = {e.name: (list(e.cflags), list(e.ldflags)) for e in loaded}
    versions = {e.name: JIT_EXTENSION_VERSIONER.get_version(e.name) for e in loaded}
    for _ in range(2):
        extension.reset()
        assert rms_norm.available()
    assert {e.name: (e.cflags, e.ldflags) for e in loaded} == flags
    assert {e.name: JIT_EXTENSION_VERSIONER.get_version(e.name) for e in loaded} == versions


def test_a_lock_left_by_a_build_that_died_does_not_stop_the_next_load(tmp_path):
    """torch's build lock file (FileBaton) outlives a process killed while it compiled; torch alone then waits for it
    forever in every later process. kiln's flock says no build is running, so the file goes and the kernel builds."""
    temp, extensions = tmp_path / "tmp", tmp_path / "extensions"
    temp.mkdir()
    (extensions / "kiln_test_staging_probe").mkdir(parents=True)
    (extensions / "kiln_test_staging_probe" / "lock").write_text("")  # what a killed build leaves
    source = write_probe(tmp_path / "install")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "TMPDIR": str(temp)}
    result = subprocess.run(
        [sys.executable, "-c", LOAD, str(source)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert "left by a build that did not finish" in result.stderr
    assert not (extensions / "kiln_test_staging_probe" / "lock").exists()
