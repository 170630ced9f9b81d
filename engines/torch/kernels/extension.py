"""Lazily compiled C++ extensions, shared by kiln's CPU kernels.

Each kernel module declares one LazyExtension: its source beside it, the compiler flags, and the
CPU flags those flags require. The first get() checks the CPU, then compiles with
torch.utils.cpp_extension.load (g++ and ninja on PATH; ~30-60 s once, cached in
TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions, and loaded in about a second afterwards).
When the CPU lacks a flag or the build fails, get() returns None after one warning, never raises,
and the kernel module uses its torch fallback. Explicit ISA flags rather than -march=native keep a
cached binary valid on any CPU that has them.

Every build gets this folder on its include path, for the headers the kernels share (kiln_bf16.h): a
source compiled from elsewhere (a test's probe) finds them too. torch's version hash covers the sources
and flags only; a changed header is rebuilt through ninja's header dependencies.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

log = logging.getLogger("kiln.kernels")

HEADERS_DIR = Path(__file__).parent  # kiln_bf16.h and any other header the kernels share


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

                    self.module = load(
                        name=self.name,
                        sources=[str(self.source)],
                        extra_cflags=self.cflags,
                        extra_ldflags=self.ldflags,
                        extra_include_paths=[str(HEADERS_DIR)],
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
