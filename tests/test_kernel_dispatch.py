"""Which variant each kernel op runs, decided from the CPU's flags alone (engines/torch/kernels/dispatch.py): a toy
op with a variant per level checks the rule, the registry's ops are checked against every CPU class, and a forced
KILN_CPU_ISA=avx2 run of `python -m engines.torch.kernels --report` names no AVX-512 or AMX kernel."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from engines import cpu_isa
from engines.torch.kernels import dispatch, extension
from engines.torch.kernels.extension import LazyExtension
from engines.torch.kernels.registry import KERNELS
from tests.cpu_classes import CPU_CLASSES

REPO = Path(__file__).resolve().parents[1]
CLASSES = list(CPU_CLASSES.items())

# A toy op, declared here (so its variants belong to this module): one variant per class it has code for,
# declared in no particular order.
TOY = types.ModuleType(__name__)
_SOURCE = Path(__file__)
_VARIANTS = [
    LazyExtension("toy_avx2", _SOURCE, [], required_cpu_flags=("avx2", "fma", "f16c")),
    LazyExtension("toy_amx", _SOURCE, [], required_cpu_flags=("avx512_bf16", "amx_tile", "amx_bf16")),
    LazyExtension("toy_vnni", _SOURCE, [], required_cpu_flags=("avx512f", "avx512bw", "avx512_vnni")),
    LazyExtension("toy_avx512", _SOURCE, [], required_cpu_flags=("avx512f", "avx512bw", "avx512vl")),
    LazyExtension("toy_avx_vnni", _SOURCE, [], required_cpu_flags=("avx2", "fma", "f16c", "avx_vnni")),
]
EXPECTED_TOY = {None: "torch", "avx2": "avx2", "avx512": "avx512", "avx512vnni": "avx512vnni"}


def test_variants_are_ordered_best_first():
    names = ["toy_amx", "toy_vnni", "toy_avx512", "toy_avx_vnni", "toy_avx2"]
    assert [v.name for v in dispatch.variants(TOY)] == names
    assert [v.isa for v in dispatch.variants(TOY)] == ["amx", "avx512vnni", "avx512", "avx2", "avx2"]


def test_an_avx2_machine_with_avx_vnni_runs_the_avx_vnni_variant():
    assert dispatch.chosen(TOY, CPU_CLASSES["alder-lake (AVX2 + AVX-VNNI)"][0]).name == "toy_avx_vnni"
    assert dispatch.chosen(TOY, CPU_CLASSES["zen3 (AVX2)"][0]).name == "toy_avx2"
    # KILN_CPU_ISA=avx2 keeps AVX-VNNI: it is an AVX2-class extension
    assert dispatch.chosen(TOY, cpu_isa.restrict(CPU_CLASSES["alder-lake (AVX2 + AVX-VNNI)"][0], "avx2")).name == (
        "toy_avx_vnni"
    )


@pytest.mark.parametrize("name, flags, level", [(name, *cls) for name, cls in CLASSES])
def test_toy_op_runs_the_best_variant_the_class_allows(name, flags, level):
    # Zen 4 has no variant of its own here: it runs the VNNI one
    expected = EXPECTED_TOY.get(level, "avx512vnni" if level == "avx512bf16" else "amx")
    assert dispatch.label(dispatch.chosen(TOY, flags)) == expected


@pytest.mark.parametrize("override", cpu_isa.LEVEL_NAMES)
def test_toy_op_under_each_override_of_the_amx_class(override):
    flags = cpu_isa.restrict(CPU_CLASSES["sapphire-rapids (AMX)"][0], override)
    expected = "avx512vnni" if override == "avx512bf16" else override
    assert dispatch.label(dispatch.chosen(TOY, flags)) == expected


@pytest.mark.parametrize("name, flags, level", [(name, *cls) for name, cls in CLASSES])
def test_registry_ops_never_run_code_above_the_class(name, flags, level):
    """Every op of the registry at every class: the variant chosen is one the CPU can run, no better one it could
    run was passed over, and none is above the class's level."""
    report = dispatch.report(flags)
    assert set(report) == set(dispatch.ops())
    rank = cpu_isa.LEVEL_NAMES.index(level) if level else -1
    for op, module in dispatch.ops().items():
        choice = dispatch.chosen(module, flags)
        runnable = [v for v in dispatch.variants(module) if v.usable_with(flags)]
        assert choice is (runnable[0] if runnable else None), op
        if report[op] in cpu_isa.LEVEL_NAMES:
            assert cpu_isa.LEVEL_NAMES.index(report[op]) <= rank, (op, report[op])
        else:
            assert report[op] in (dispatch.TORCH, dispatch.ANY_X86), (op, report[op])


def test_registry_kernels_that_need_native_bf16_or_amx_run_only_there():
    for name, (flags, level) in CPU_CLASSES.items():
        report = dispatch.report(flags)
        assert (report["amx_linear"] == "amx") == (level == "amx"), name
        assert (report["bf16_linear"] != "torch") == cpu_isa.native_bf16(flags), name
        # Q4_1 and int8 steps of many bf16 rows: the panels wherever AVX512-BF16 is, int_gemv's kernels below it
        assert report["panel_linear"] == ("avx512bf16" if "avx512_bf16" in flags else "torch"), name


def test_every_registered_extension_has_a_variant_in_the_report():
    owners = {module.__name__ for module in dispatch.ops().values()}
    kernel_extensions = [e for e in extension.EXTENSIONS if e.owner.startswith("engines.torch.kernels.")]
    assert kernel_extensions and {e.owner for e in kernel_extensions} <= owners


def run_report(isa: str) -> subprocess.CompletedProcess:
    env = {"KILN_CPU_ISA": isa, "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    return subprocess.run(
        [sys.executable, "-m", "engines.torch.kernels", "--report"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_forced_avx2_report_names_no_avx512_or_amx_kernel():
    if cpu_isa.level_of(cpu_isa.proc_cpu_flags()) is None:
        pytest.fail("this test needs an x86-64 CPU with AVX2+FMA+F16C")
    result = run_report("avx2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("CPU ISA level: avx2 (KILN_CPU_ISA; the CPU has ")
    implementations = {op: rest.split()[0] for op, rest in (line.strip().split(": ") for line in lines[1:])}
    assert set(implementations) == set(dispatch.ops())
    assert set(implementations.values()) <= {"avx2", dispatch.ANY_X86, dispatch.TORCH}


def test_report_refuses_a_level_the_cpu_lacks():
    lacking = [name for name in cpu_isa.LEVEL_NAMES if name not in cpu_isa.levels_reached(cpu_isa.proc_cpu_flags())]
    result = run_report(lacking[0] if lacking else "avx1024")
    assert result.returncode == 2 and result.stdout == ""
    assert "this CPU has" in result.stderr


def test_all_levels_compiles_every_build_this_cpu_runs():
    """`python -m engines.torch.kernels --all-levels` (make test runs it first): one line per build this CPU may
    run, each compiled, then one per kernel module."""
    result = subprocess.run(
        [sys.executable, "-m", "engines.torch.kernels", "--all-levels", "--jobs", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr
    status = dict(line.split(": ", 1) for line in result.stdout.splitlines() if line.startswith("kiln_"))
    runnable = {  # kiln's builds only: tests declare probe extensions of their own in this process
        e.name
        for e in extension.EXTENSIONS
        if e.owner.startswith("engines.torch.kernels.") and e.usable_with(cpu_isa.cpu_flags())
    }
    assert runnable and {status.get(name) for name in runnable} == {"compiled"}, status
    assert {name: status[name] for name in KERNELS} == {
        name: "compiled" if module.available() else "unavailable (torch fallback)" for name, module in KERNELS.items()
    }
