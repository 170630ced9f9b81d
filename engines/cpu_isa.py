"""CPU instruction-set levels, and the KILN_CPU_ISA override that restricts kiln to a lower one.

kiln's CPU kernels, `--dtype auto` and the build profiles all decide from the CPU's feature flags, and they all
read them here (`cpu_flags()`), so one environment variable moves every decision to a lower class of CPU: an
AVX-512 machine can run, and CI can test, what an AVX2 laptop or an Ice Lake server runs. Levels, lowest first,
and the /proc/cpuinfo flags each adds to the one below:

| level        | requires                                   | also belongs to it (removed with it, not required) |
|--------------|--------------------------------------------|-----------------------------------------------------|
| `avx2`       | avx2, fma, f16c                            | avx_vnni (256-bit VNNI: Alder Lake, Zen 5; kept)   |
| `avx512`     | avx512f, avx512bw, avx512vl, avx512dq      | avx512cd, avx512vbmi, avx512_vbmi2, avx512ifma, ... |
| `avx512vnni` | avx512_vnni                                | –                                                   |
| `avx512bf16` | avx512_bf16                                | –                                                   |
| `amx`        | amx_tile, amx_bf16, amx_int8               | amx_fp16, amx_complex, avx512_fp16                  |

A CPU's level is the highest one whose flags, and those of every level below, it has all of (a CPU without
AVX2+FMA+F16C has none, and kiln runs torch code there). avx512_fp16 belongs to `amx` because only CPUs with AMX
(Sapphire Rapids on) have it. KILN_CPU_ISA=<level> removes the flags of every level above <level>; it never adds
a flag, so a level this CPU does not reach, or a name not in the table, is refused with the levels it has.

The variable is read once per process (kernels are compiled and loaded once per process); `reset()` makes the
next `cpu_flags()` read it and /proc/cpuinfo again (tests that change it with monkeypatch call
`engines.torch.kernels.extension.reset()`, which also forgets which kernels were loaded). Importing this module
needs no torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

ENV_VAR = "KILN_CPU_ISA"


@dataclass(frozen=True)
class Level:
    name: str
    requires: frozenset[str]  # a CPU has this level when it has these (and every lower level's)
    extra: frozenset[str] = frozenset()  # flags of the same generation, removed with the level, not required

    @property
    def flags(self) -> frozenset[str]:
        return self.requires | self.extra


LEVELS = (
    # AVX-VNNI (256-bit dot products) is kept at every level: it is an AVX2-class extension, optional there.
    Level("avx2", frozenset({"avx2", "fma", "f16c"}), frozenset({"avx_vnni"})),
    Level(
        "avx512",
        frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"}),
        frozenset({"avx512cd", "avx512vbmi", "avx512_vbmi2", "avx512ifma", "avx512_bitalg", "avx512_vpopcntdq"}),
    ),
    Level("avx512vnni", frozenset({"avx512_vnni"})),
    Level("avx512bf16", frozenset({"avx512_bf16"})),
    Level(
        "amx", frozenset({"amx_tile", "amx_bf16", "amx_int8"}), frozenset({"amx_fp16", "amx_complex", "avx512_fp16"})
    ),
)
LEVEL_NAMES = tuple(level.name for level in LEVELS)
# Every flag some level owns: the only flags KILN_CPU_ISA may remove.
LEVEL_FLAGS = frozenset().union(*(level.flags for level in LEVELS))


class CpuIsaError(ValueError):
    """KILN_CPU_ISA names an unknown level or one this CPU lacks."""


def level_of(flags: frozenset[str] | set[str]) -> str | None:
    """The highest level `flags` reach (every lower level's required flags present too); None below avx2."""
    reached = None
    for level in LEVELS:
        if not level.requires <= flags:
            break
        reached = level.name
    return reached


def levels_reached(flags: frozenset[str] | set[str]) -> tuple[str, ...]:
    top = level_of(flags)
    return LEVEL_NAMES[: LEVEL_NAMES.index(top) + 1] if top else ()


def label(required: tuple[str, ...] | frozenset[str]) -> str | None:
    """The class a kernel compiled for the `required` flags belongs to: the highest level owning one of them
    (("avx512f", "avx512bw") is avx512, ("avx2", "fma", "avx_vnni") avx2); None when no level owns any of them
    (code for any x86-64 CPU)."""
    highest = None
    for index, level in enumerate(LEVELS):
        if level.flags & set(required):
            highest = index
    return None if highest is None else LEVEL_NAMES[highest]


def native_bf16(flags: frozenset[str] | set[str]) -> bool:
    """Whether bf16 math runs natively (AVX512-BF16 or AMX-BF16). Elsewhere oneDNN emulates it, and kiln's bf16
    kernels fall back: on Ice Lake bf16 served at 0.67x float32's tok/s at c=32 (docs/performance.md)."""
    return bool(set(flags) & {"avx512_bf16", "amx_bf16"})


def restrict(flags: frozenset[str] | set[str], override: str | None) -> frozenset[str]:
    """`flags` without those of the levels above `override` (None or "": unchanged). Raises CpuIsaError for an
    unknown level or one `flags` do not reach."""
    flags = frozenset(flags)
    if not override:
        return flags
    reached = levels_reached(flags)
    if override not in reached:
        has = ", ".join(reached) if reached else "none of them (no AVX2+FMA+F16C)"
        kind = "is not a CPU level" if override not in LEVEL_NAMES else "asks for a level this CPU lacks"
        raise CpuIsaError(f"{ENV_VAR}={override} {kind}; levels: {', '.join(LEVEL_NAMES)}; this CPU has {has}.")
    above = LEVELS[LEVEL_NAMES.index(override) + 1 :]
    return flags - frozenset().union(*(level.flags for level in above))


def override() -> str | None:
    return os.environ.get(ENV_VAR, "").strip().lower() or None


def proc_cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The feature flags of /proc/cpuinfo's first processor (or of `cpuinfo`'s text); empty where there is none."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:  # not Linux: no flags, every kernel falls back to torch
            return frozenset()
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


@cache
def cpu_flags() -> frozenset[str]:
    """This CPU's flags as kiln uses them: /proc/cpuinfo's, restricted by KILN_CPU_ISA (raises CpuIsaError when
    the variable is wrong). Cached: kernel dispatch asks often; `reset()` forgets it."""
    return restrict(proc_cpu_flags(), override())


def check() -> None:
    """Fail now, with one sentence, if KILN_CPU_ISA is wrong (entry points call this before anything starts)."""
    cpu_flags()


def reset() -> None:
    cpu_flags.cache_clear()


def describe() -> str:
    """This process's level in words, e.g. "avx2 (KILN_CPU_ISA; the CPU has avx512bf16)"."""
    level = level_of(cpu_flags()) or "below avx2"
    if override():
        return f"{level} ({ENV_VAR}; the CPU has {level_of(proc_cpu_flags()) or 'below avx2'})"
    return level
