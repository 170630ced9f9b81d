"""The default build profile and what each CPU class may build, by class (tests/cpu_classes.py): INT8 weights by
default everywhere (INT4 when memory is short), bf16 only where bf16 is native, the rule `--dtype auto` follows."""

from __future__ import annotations

import pytest

from engines import cpu_isa
from engines.profiles import load_profiles, pick, supported_on
from tests.cpu_classes import CPU_CLASSES, cpu_hardware

GiB = 1 << 30
SMALL_MODEL_BF16 = 0.27e9  # SmolLM2-135M
LARGE_MODEL_BF16 = 16e9  # an 8B model: its INT8 weights take more than half of 12 GiB


@pytest.fixture(scope="module")
def profiles():
    return load_profiles()


@pytest.mark.parametrize("name", list(CPU_CLASSES))
def test_default_profile_per_cpu_class(profiles, name):
    flags, _ = CPU_CLASSES[name]
    hardware = cpu_hardware(flags)
    assert pick(hardware, SMALL_MODEL_BF16, hardware.memory_bytes, profiles).name == "cpu-int8"
    short = cpu_hardware(flags, memory_bytes=12 * GiB)
    assert pick(short, LARGE_MODEL_BF16, short.memory_bytes, profiles).name == "cpu-int4"


@pytest.mark.parametrize("name", list(CPU_CLASSES))
def test_bf16_profile_only_where_bf16_is_native(profiles, name):
    flags, level = CPU_CLASSES[name]
    (bf16,) = [p for p in profiles if p.name == "cpu-bf16"]
    supported, why = supported_on(bf16, cpu_hardware(flags))
    assert supported == (level in ("avx512bf16", "amx")) == cpu_isa.native_bf16(flags)
    if not supported:
        assert why == "needs CPU flag avx512_bf16 or amx_bf16"


@pytest.mark.parametrize("override", cpu_isa.LEVEL_NAMES)
def test_an_amx_cpu_forced_to_a_lower_class_picks_as_that_class_does(profiles, override):
    flags = cpu_isa.restrict(CPU_CLASSES["sapphire-rapids (AMX)"][0], override)
    (bf16,) = [p for p in profiles if p.name == "cpu-bf16"]
    assert supported_on(bf16, cpu_hardware(flags))[0] == (override in ("avx512bf16", "amx"))
    assert pick(cpu_hardware(flags), SMALL_MODEL_BF16, 64 * GiB, profiles).name == "cpu-int8"
