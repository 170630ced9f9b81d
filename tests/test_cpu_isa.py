"""CPU ISA levels and the KILN_CPU_ISA override (engines/cpu_isa.py): the level of each CPU class, what each
override removes, the refusal of a level the CPU lacks, and that hardware detection, `--dtype auto` and the `kiln`
command all read the restricted flags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engines import cpu_isa
from engines.hardware import _detect_cpu
from engines.torch.kernels import extension
from engines.torch.loader import pick_dtype
from tests.cpu_classes import CPU_CLASSES

REPO = Path(__file__).resolve().parents[1]
CLASSES = list(CPU_CLASSES.items())
ZEN4_FLAGS = CPU_CLASSES["zen4 (AVX512-BF16)"][0]
SPR_FLAGS = CPU_CLASSES["sapphire-rapids (AMX)"][0]


@pytest.mark.parametrize("name, flags, level", [(name, *cls) for name, cls in CLASSES])
def test_each_cpu_class_gets_its_level(name, flags, level):
    assert cpu_isa.level_of(flags) == level


def test_a_level_needs_every_level_below_it():
    # AVX-512 flags without FMA (no real CPU): not avx512, not even avx2
    assert cpu_isa.level_of({"avx2", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"}) is None
    # AVX512-BF16 without VNNI stops at avx512
    assert cpu_isa.level_of(CPU_CLASSES["skylake-x (AVX-512)"][0] | {"avx512_bf16"}) == "avx512"


def test_levels_own_disjoint_flags():
    seen: set[str] = set()
    for level in cpu_isa.LEVELS:
        assert not level.flags & seen, f"{level.name} repeats {level.flags & seen}"
        seen |= level.flags


@pytest.mark.parametrize("override", cpu_isa.LEVEL_NAMES)
def test_override_keeps_its_level_and_below_and_removes_the_rest(override):
    restricted = cpu_isa.restrict(SPR_FLAGS, override)
    assert cpu_isa.level_of(restricted) == override
    above = cpu_isa.LEVELS[cpu_isa.LEVEL_NAMES.index(override) + 1 :]
    assert not restricted & frozenset().union(*(level.flags for level in above))
    assert SPR_FLAGS - restricted <= cpu_isa.LEVEL_FLAGS  # flags no level owns are never removed
    assert {"sse4_2", "avx"} <= restricted


def test_override_avx2_keeps_avx_vnni_and_drops_every_avx512_and_amx_flag():
    alder_lake_like = SPR_FLAGS | {"avx_vnni"}
    restricted = cpu_isa.restrict(alder_lake_like, "avx2")
    assert {"avx2", "fma", "f16c", "avx_vnni"} <= restricted
    assert not any(flag.startswith(("avx512", "amx")) for flag in restricted)


def test_no_override_changes_nothing():
    assert cpu_isa.restrict(ZEN4_FLAGS, None) == ZEN4_FLAGS


@pytest.mark.parametrize(
    "override, words",
    [
        ("amx", "KILN_CPU_ISA=amx asks for a level this CPU lacks"),
        ("sse4", "KILN_CPU_ISA=sse4 is not a CPU level"),
    ],
)
def test_refused_overrides_name_the_levels_this_cpu_has(override, words):
    with pytest.raises(cpu_isa.CpuIsaError) as caught:
        cpu_isa.restrict(ZEN4_FLAGS, override)
    message = str(caught.value)
    assert message.startswith(words) and message.endswith("this CPU has avx2, avx512, avx512vnni, avx512bf16.")
    assert message.count(". ") == 0  # one sentence


def test_a_cpu_below_avx2_can_be_given_no_level():
    with pytest.raises(cpu_isa.CpuIsaError, match="this CPU has none of them"):
        cpu_isa.restrict(CPU_CLASSES["sandy-bridge (no AVX2)"][0], "avx2")


def test_kernel_flags_follow_the_variable_after_reset(monkeypatch, kernels_decide_again):
    """The kernels' one source of flags reads KILN_CPU_ISA; reset() makes a changed value count."""
    real = cpu_isa.proc_cpu_flags()
    if cpu_isa.level_of(real) is None:
        pytest.fail("this test needs an x86-64 CPU with AVX2+FMA+F16C (levels to restrict to)")
    assert extension.cpu_flags() == real
    monkeypatch.setenv("KILN_CPU_ISA", "avx2")
    assert extension.cpu_flags() == real  # read once per process: a kernel's choice does not change under it
    extension.reset()
    assert cpu_isa.level_of(extension.cpu_flags()) == "avx2"
    assert not any(flag.startswith(("avx512", "amx")) for flag in extension.cpu_flags())


def test_hardware_detection_reads_the_restricted_flags(monkeypatch, kernels_decide_again):
    cpuinfo = "model name\t: Test Xeon\nflags\t\t: " + " ".join(sorted(SPR_FLAGS)) + "\n"
    meminfo = "MemTotal:       2048 kB\n"
    assert _detect_cpu(cpuinfo=cpuinfo, meminfo=meminfo).cpu_level == "amx"
    monkeypatch.setenv("KILN_CPU_ISA", "avx512vnni")
    hardware = _detect_cpu(cpuinfo=cpuinfo, meminfo=meminfo)
    assert hardware.cpu_level == "avx512vnni" and not hardware.supports_bf16
    assert "(avx512vnni: avx2 avx512f avx512_vnni)" in hardware.describe()


@pytest.mark.parametrize("name, flags, level", [(name, *cls) for name, cls in CLASSES])
def test_dtype_auto_is_bfloat16_only_with_native_bf16(monkeypatch, kernels_decide_again, name, flags, level):
    """Ice Lake has AVX-512 (oneDNN "supports" bf16 there, by emulation) but serves float32 faster."""
    monkeypatch.setattr(cpu_isa, "proc_cpu_flags", lambda: flags)
    extension.reset()
    native = level in ("avx512bf16", "amx")
    assert pick_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
    assert pick_dtype("float32", torch.device("cpu")) == torch.float32


def test_dtype_auto_follows_the_override(monkeypatch, kernels_decide_again):
    monkeypatch.setattr(cpu_isa, "proc_cpu_flags", lambda: SPR_FLAGS)
    monkeypatch.setenv("KILN_CPU_ISA", "avx512vnni")
    extension.reset()
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32


def run_kiln(*args: str, isa: str) -> subprocess.CompletedProcess:
    env = {"KILN_CPU_ISA": isa, "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def test_kiln_refuses_a_wrong_override_in_one_sentence_before_doing_anything():
    result = run_kiln("profiles", isa="avx1024")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("kiln: KILN_CPU_ISA=avx1024 is not a CPU level; levels: avx2, avx512")
    assert result.stderr.count("\n") == 1


def test_kiln_profiles_under_an_override_loses_the_bf16_profile():
    if cpu_isa.level_of(cpu_isa.proc_cpu_flags()) is None:
        pytest.fail("this test needs an x86-64 CPU with AVX2+FMA+F16C")
    result = run_kiln("profiles", isa="avx2")
    assert result.returncode == 0, result.stderr
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("cpu-bf16 ")]
    assert row.endswith("no: needs CPU flag avx512_bf16 or amx_bf16")
    assert "RAM (avx2: avx2)" in result.stdout and "--precision auto picks cpu-int8" in result.stdout
