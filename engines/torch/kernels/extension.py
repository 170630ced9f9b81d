"""Lazily compiled C++ extensions, shared by kiln's CPU kernels.

Each kernel module declares one LazyExtension: its source beside it, the compiler flags, and the
CPU flags those flags require. The first get() checks the CPU, then compiles with
torch.utils.cpp_extension.load (g++ and ninja on PATH; ~30-60 s once, cached in
TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions, and loaded in about a second afterwards).
When the CPU lacks a flag or the build fails, get() returns None after one warning, never raises,
and the kernel module uses its torch fallback. Explicit ISA flags rather than -march=native keep a
cached binary valid on any CPU that has them.

Each build compiles a copy of its source and of the headers the kernels share (kiln_bf16.h, in this
folder), staged in TORCH_EXTENSIONS_DIR under a hash of their contents (`stage_sources`): the compile
command then names the same paths wherever kiln is installed (a repository, a wheel in another venv, an
image), so ninja reuses a kernel already built from identical sources instead of rebuilding it because the
path in its command changed; a changed source or header is a new folder and a rebuild. A source compiled
from elsewhere (a test's probe) gets the shared headers the same way.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

log = logging.getLogger("kiln.kernels")

HEADERS_DIR = Path(__file__).parent  # kiln_bf16.h and any other header the kernels share


def extensions_root() -> Path:
    """Where torch keeps compiled extensions (TORCH_EXTENSIONS_DIR, else its default cache folder)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def stage_sources(source: Path) -> Path:
    """`source` and the shared headers copied to <extensions root>/kiln-sources/<hash of their contents>/,
    created once and never rewritten (so their times stay older than what was built from them); returns the
    staged source. The folder appears whole or not at all (written beside it, then renamed)."""
    files = [source, *sorted(HEADERS_DIR.glob("*.h"))]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    staged = extensions_root() / "kiln-sources" / digest.hexdigest()[:16]
    if not staged.is_dir():
        staged.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".staging-", dir=staged.parent))
        for path in files:
            shutil.copyfile(path, scratch / path.name)
        try:
            scratch.rename(staged)
        except OSError:  # another process staged the same contents first
            shutil.rmtree(scratch, ignore_errors=True)
    return staged / source.name


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


class LazyExtension:
    def __init__(
        self,
        name: str,
        source: Path,
        cflags: list[str],
        *,
        required_cpu_flags: tuple[str, ...] = (),
        ldflags: list[str] | None = None,
        fallback: str = "torch code",
    ):
        self.name, self.source, self.cflags, self.ldflags = name, source, cflags, ldflags or []
        self.required_cpu_flags, self.fallback = required_cpu_flags, fallback
        self.module = None
        self.tried = False
        self._lock = threading.Lock()

    def get(self):
        """The compiled module, or None when it cannot be used here (compiles it on the first call)."""
        if self.tried:
            return self.module
        with self._lock:
            if not self.tried:
                try:
                    have = cpu_flags()
                    missing = [flag for flag in self.required_cpu_flags if flag not in have]
                    if missing:
                        raise RuntimeError(f"the CPU lacks {', '.join(missing)}")
                    from torch.utils.cpp_extension import load

                    staged = stage_sources(self.source)
                    self.module = load(
                        name=self.name,
                        sources=[str(staged)],
                        extra_cflags=self.cflags,
                        extra_ldflags=self.ldflags,
                        extra_include_paths=[str(staged.parent)],
                        verbose=False,
                    )
                except Exception as e:  # no compiler, no ninja, unsupported CPU...
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    log.warning("%s kernel unavailable, %s is used instead: %s", self.name, self.fallback, first)
                    self.module = None
                self.tried = True
        return self.module

    def available(self) -> bool:
        return self.get() is not None
