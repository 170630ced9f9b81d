"""One kernel source compiled once per x86 ISA level, and the best level the CPU has chosen at load.

The elementwise kernels (rms_norm, silu_mul, rope_kv, argmax, token_mask) are written once against kiln_simd.h,
which maps its vector operations to AVX-512 or to AVX2 by the compiler flags. Each level is its own
LazyExtension with its own name (the AVX-512 build keeps the kernel's historical name, the AVX2 build adds
`_avx2`), so the builds do not clash in TORCH_EXTENSIONS_DIR, and is recorded as the kernel module's own, so
dispatch.py reports it. `get()` takes the highest level whose CPU flags `extension.cpu_flags()` reports (after
KILN_CPU_ISA) and that compiles, dispatch.py's rule; with none, the kernel module uses its torch fallback.
"""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from engines.torch.kernels import extension
from engines.torch.kernels.extension import LazyExtension

log = logging.getLogger("kiln.kernels")


@dataclass(frozen=True)
class IsaLevel:
    name: str
    suffix: str  # appended to the extension's name
    cflags: tuple[str, ...]
    cpu_flags: tuple[str, ...]  # /proc/cpuinfo's names for what cflags let the compiler use


# highest first: the order get() tries them in
LEVELS = (
    IsaLevel("avx512", "", ("-mavx512f", "-mavx512bw", "-mavx512vl"), ("avx512f", "avx512bw", "avx512vl")),
    IsaLevel("avx2", "_avx2", ("-mavx2", "-mfma", "-mf16c"), ("avx2", "fma", "f16c")),
)


class IsaVariants:
    """LazyExtension's get() / available() over the ISA levels: the highest the CPU runs that builds."""

    def __init__(
        self,
        name: str,
        source: Path,
        cflags: list[str],
        *,
        ldflags: list[str],
        fallback: str,
        sources: dict[str, Path] | None = None,  # a level's own source instead of `source`
    ):
        self.name, self.fallback = name, fallback
        owner = sys._getframe(1).f_globals.get("__name__", "")  # the kernel module declaring these variants
        self.variants = {}
        for level in LEVELS:
            variant = LazyExtension(
                name + level.suffix,
                (sources or {}).get(level.name, source),
                [*cflags, *level.cflags],
                required_cpu_flags=level.cpu_flags,
                ldflags=ldflags,
                fallback=f"a lower ISA level or {fallback}",
            )
            variant.owner = owner  # dispatch.py reports it under that module, not under this one
            self.variants[level.name] = variant
        self.level: str | None = None  # the level get() chose, None for the torch fallback
        self.module = None
        # the cpu_flags() object the choice was made for: extension.reset() (KILN_CPU_ISA changed) makes a new one,
        # and the next call decides again; one identity test per call otherwise (the ops run per layer and step)
        self.decided_for: frozenset[str] | None = None
        self._lock = threading.Lock()

    def runnable(self) -> list[str]:
        """The levels this CPU has the flags for, highest first."""
        have = extension.cpu_flags()
        return [level.name for level in LEVELS if all(flag in have for flag in level.cpu_flags)]

    def get(self):
        flags = extension.cpu_flags()
        if self.decided_for is flags:
            return self.module
        with self._lock:
            if self.decided_for is not flags:
                self.level, self.module = None, None
                for level in self.runnable():
                    module = self.variants[level].get()
                    if module is not None:
                        self.level, self.module = level, module
                        break
                else:
                    needs = " or ".join(", ".join(level.cpu_flags) for level in LEVELS)
                    log.warning(
                        "%s kernel unavailable (needs %s and a build), %s is used instead",
                        self.name,
                        needs,
                        self.fallback,
                    )
                self.decided_for = flags
        return self.module

    def available(self) -> bool:
        return self.get() is not None
