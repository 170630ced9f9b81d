"""Which implementation each CPU kernel op uses at this ISA level: the dispatch report.

An op is a kernel module of the registry; its variants are the LazyExtensions it declared (each records its
module). The op runs the variant of the highest ISA level whose required flags the CPU has (after KILN_CPU_ISA),
and torch code when none qualifies or none compiles. `report()` answers from the flags alone, without
compiling, so tests can check the choice for any CPU class; `report(compiled=True)` also requires that the
variant compiles and loads here (what the engine logs at start, once its warm-up has loaded them).

Labels: an ISA level (engines/cpu_isa.py) for a variant compiled for that level's flags, "x86-64" for a variant
that requires no flags (plain C++, compiled for any x86-64 CPU), "torch" for the op's torch fallback.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType

from engines import cpu_isa
from engines.torch.kernels import extension
from engines.torch.kernels.extension import LazyExtension
from engines.torch.kernels.registry import KERNELS

TORCH = "torch"
ANY_X86 = "x86-64"


def ops() -> dict[str, ModuleType]:
    """Each kernel module once, by its short name (rms_norm, int_linear, ...)."""
    return {module.__name__.rsplit(".", 1)[-1]: module for module in KERNELS.values()}


def variants(module: ModuleType) -> list[LazyExtension]:
    """The module's variants, best first: highest ISA level first; within a level the one requiring more flags
    (an AVX2 variant that also needs AVX-VNNI before the plain AVX2 one), then declaration order."""
    declared = [ext for ext in extension.EXTENSIONS if ext.owner == module.__name__]
    return sorted(declared, key=lambda ext: (-_rank(ext.isa), -len(set(ext.required_cpu_flags))))


def _rank(level: str | None) -> int:
    return cpu_isa.LEVEL_NAMES.index(level) if level else -1


def chosen(module: ModuleType, flags: Iterable[str], compiled: bool = False) -> LazyExtension | None:
    """The variant the op runs on a CPU with `flags` (None: torch code); with compiled=True, the best one that also
    compiles and loads here."""
    flags = frozenset(flags)
    for variant in variants(module):
        if variant.usable_with(flags) and (not compiled or variant.available()):
            return variant
    return None


def label(variant: LazyExtension | None) -> str:
    if variant is None:
        return TORCH
    return variant.isa or ANY_X86


def report(flags: Iterable[str] | None = None, compiled: bool = False) -> dict[str, str]:
    """{op: label} for a CPU with `flags` (default: this one's, after KILN_CPU_ISA)."""
    flags = extension.cpu_flags() if flags is None else frozenset(flags)
    return {name: label(chosen(module, flags, compiled)) for name, module in ops().items()}
