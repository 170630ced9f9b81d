"""Lazily compiled C++ extensions, shared by kiln's CPU kernels.

Each kernel module declares one LazyExtension per variant: its source beside it, the compiler flags, and the
CPU flags those flags require (a variant compiled with other flags has its own name, e.g. kiln_rms_norm_avx2,
so that builds do not clash in the cache). The first get() checks the CPU, then compiles with
torch.utils.cpp_extension.load (g++ and ninja on PATH; ~30-60 s once, cached in
TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions, and loaded in about a second afterwards).
When the CPU lacks a flag or the build fails, get() returns None after one warning, and the kernel
module uses its torch fallback; it raises only for a wrong KILN_CPU_ISA, which every entry point refuses
first. Explicit ISA flags rather than -march=native keep a cached binary valid on any CPU that has them.

The CPU's flags come from `cpu_flags()`, the one place kernels read them: /proc/cpuinfo restricted by
KILN_CPU_ISA (engines/cpu_isa.py), so a variant is chosen, and the report of `python -m engines.torch.kernels
--report` made, from the same flags. Each LazyExtension records the kernel module that declared it, so the report
(dispatch.py) finds a module's variants without the module listing them. `reset()` forgets the flags and every
extension's outcome, for tests that change KILN_CPU_ISA.

Each build compiles a copy of its source and of the headers the kernels share (kiln_bf16.h, in this
folder), staged under the temporary folder by a hash of their contents, with one fixed, old modification
time (`stage_sources`). The compile command then names the same paths and ninja sees the same inputs wherever
kiln is installed (a repository, a wheel in another venv, an image) and wherever the built kernels were
copied (the Helm chart seeds a pod's TORCH_EXTENSIONS_DIR from the image's), so a kernel built from identical
sources is loaded, not rebuilt because a path in its command changed. A changed source or header is a new
folder and a rebuild. A source compiled from elsewhere (a test's probe) gets the shared headers the same way.

torch serializes builds of one extension with a lock file in its build folder (torch.utils.file_baton.FileBaton,
taken in cpp_extension._jit_compile): a process killed while it compiled leaves that file behind, and every later
load of the extension, compiled or not, waited for it forever (a `kiln serve` stopped during its first start never
started again, without a word at the default log level). kiln's builds therefore also hold an flock on the folder,
which the kernel releases when its holder dies: whoever holds it knows that a lock file there is a dead build's and
removes it (`exclusive_build`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from engines import cpu_isa

log = logging.getLogger("kiln.kernels")

HEADERS_DIR = Path(__file__).parent  # kiln_bf16.h and any other header the kernels share


# Staged files carry this time (2000-01-01) rather than their copy's: their content is fixed by the folder's
# name, so nothing built from them can be older than what they hold.
STAGED_MTIME = 946684800


@contextmanager
def exclusive_build(name: str) -> Iterator[None]:
    """While torch loads (or compiles) extension `name`: no other kiln process does, and a lock file left in its build
    folder by a build that died is gone (see the module's docstring)."""
    import fcntl

    from torch.utils.cpp_extension import _get_build_directory

    folder = Path(_get_build_directory(name, verbose=False))
    try:
        fd = os.open(folder / "kiln.flock", os.O_CREAT | os.O_RDWR, 0o644)
    except OSError:  # a folder kiln may not write: torch's own lock decides, as before
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        stale = folder / "lock"
        if stale.exists():
            log.warning("%s: removing %s, left by a build that did not finish", name, stale)
            stale.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)  # releases the flock


def staging_root() -> Path:
    return Path(tempfile.gettempdir()) / "kiln-kernel-sources"


def stage_sources(source: Path) -> Path:
    """`source` and the shared headers copied to <tmp>/kiln-kernel-sources/<hash of their contents>/; returns
    the staged source. The folder appears whole or not at all (written beside it, then renamed), and is
    written again identically if a temporary-file cleaner removed any of it. Where it cannot be written, the source
    is compiled where it is (a rebuild wherever that path changes, as torch alone would do)."""
    files = [source, *sorted(HEADERS_DIR.glob("*.h"))]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    staged = staging_root() / digest.hexdigest()[:16]
    if not all((staged / path.name).is_file() for path in files):
        try:
            staged.parent.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=".staging-", dir=staged.parent))
        except OSError as e:
            log.debug("kernel sources not staged (%s): compiling %s in place", e, source)
            return source
        for path in files:
            shutil.copyfile(path, scratch / path.name)
            os.utime(scratch / path.name, (STAGED_MTIME, STAGED_MTIME))
        scratch.chmod(0o755)  # mkdtemp's 0700 would hide the sources from other users of the machine
        shutil.rmtree(staged, ignore_errors=True)  # a folder a temporary-file cleaner emptied in part
        try:
            scratch.rename(staged)
        except OSError:  # another process staged the same contents first
            shutil.rmtree(scratch, ignore_errors=True)
    return staged / source.name


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as kiln uses them: /proc/cpuinfo's (empty where there is none), without those of the
    levels above KILN_CPU_ISA. Raises engines.cpu_isa.CpuIsaError when that variable is wrong."""
    return cpu_isa.cpu_flags()


EXTENSIONS: list[LazyExtension] = []  # every variant declared, in import order


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
        ready: Callable[[object], bool] | None = None,
    ):
        """`ready(module)`, when given, runs once after loading; False makes the extension unavailable (AMX: the
        kernel asks Linux for the tile state)."""
        self.name, self.source, self.cflags, self.ldflags = name, source, cflags, ldflags or []
        self.required_cpu_flags, self.fallback, self.ready = required_cpu_flags, fallback, ready
        # the kernel module that declared this variant (the caller's), for the dispatch report
        self.owner: str = sys._getframe(1).f_globals.get("__name__", "")
        self.module = None
        self.tried = False
        self._lock = threading.Lock()
        EXTENSIONS.append(self)

    @property
    def isa(self) -> str | None:
        """The ISA level its required flags belong to (engines/cpu_isa.py); None: any x86-64 CPU."""
        return cpu_isa.label(self.required_cpu_flags)

    def usable_with(self, flags: Iterable[str]) -> bool:
        """Whether a CPU with `flags` may run it (no compiling: what dispatch and its tests decide from)."""
        return set(self.required_cpu_flags) <= set(flags)

    def get(self):
        """The compiled module, or None when it cannot be used here (compiles it on the first call)."""
        if self.tried:
            return self.module
        with self._lock:
            if not self.tried:
                have = cpu_flags()  # outside the fallback below: a wrong KILN_CPU_ISA stops the process
                try:
                    missing = [flag for flag in self.required_cpu_flags if flag not in have]
                    if missing:
                        raise RuntimeError(f"the CPU lacks {', '.join(missing)}")
                    from torch.utils.cpp_extension import load

                    staged = stage_sources(self.source)
                    with exclusive_build(self.name):
                        self.module = load(
                            name=self.name,
                            sources=[str(staged)],
                            # copies: torch.utils.cpp_extension._prepare_ldflags appends torch's libraries to the list
                            # it is given, and JIT_EXTENSION_VERSIONER.bump_version_if_changed hashes these arguments,
                            # so passing ours made every later load of this extension (after reset(), e.g. under
                            # another KILN_CPU_ISA in the tests) a new version, compiled again (~15 s each)
                            extra_cflags=list(self.cflags),
                            extra_ldflags=list(self.ldflags),
                            # the shared headers: staged beside the source, or this folder when not staged
                            extra_include_paths=[str(staged.parent if staged != self.source else HEADERS_DIR)],
                            verbose=False,
                        )
                    if self.ready is not None and not self.ready(self.module):
                        raise RuntimeError("it refused to start on this machine")
                except Exception as e:  # no compiler, no ninja, unsupported CPU...
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    log.warning("%s kernel unavailable, %s is used instead: %s", self.name, self.fallback, first)
                    self.module = None
                self.tried = True
        return self.module

    def available(self) -> bool:
        return self.get() is not None

    def forget(self) -> None:
        """Decide again on the next get() (the loaded library stays loaded; loading it again is cheap)."""
        with self._lock:
            self.module, self.tried = None, False


def reset() -> None:
    """Read KILN_CPU_ISA and the CPU's flags again and forget which extensions were loaded, so the next call of
    every kernel decides under the flags now in force. For tests that set KILN_CPU_ISA with monkeypatch: call it
    after setting the variable and again after monkeypatch restored it."""
    cpu_isa.reset()
    for extension in EXTENSIONS:
        extension.forget()
