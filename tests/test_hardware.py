"""Hardware detection reads the real machine; capability helpers answer from injected hardware."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from engines.hardware import CPU_FLAGS_OF_INTEREST, Hardware, _detect_cpu, detect


def _proc_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


@pytest.mark.skipif(
    torch.cuda.is_available() or not Path("/proc/cpuinfo").exists(), reason="needs a Linux machine without a GPU"
)
def test_detect_reports_this_cpu():
    hw = detect()
    assert hw.device == "cpu" and hw.sm is None and hw.count == 1
    assert hw.cpu_flags == _proc_flags() & set(CPU_FLAGS_OF_INTEREST)
    assert hw.cores == len(os.sched_getaffinity(0))
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kb = int(next(line for line in meminfo if line.startswith("MemTotal:")).split()[1])
    assert 0 < hw.memory_bytes <= mem_kb * 1024
    assert hw.name and hw.name in hw.describe()
    data = hw.to_dict()
    assert data["device"] == "cpu" and data["cpu_flags"] == sorted(hw.cpu_flags)
    assert data["description"] == hw.describe()


def test_cpu_parsing_from_text():
    cpuinfo = "processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse avx2 avx512f amx_int8 weird\n"
    hw = _detect_cpu(cpuinfo=cpuinfo, meminfo="MemTotal:       2048 kB\nMemFree: 1 kB\n")
    assert hw.name == "Test CPU 9000"
    assert hw.cpu_flags == {"avx2", "avx512f", "amx_int8"}
    assert hw.memory_bytes <= 2048 * 1024


@pytest.mark.parametrize(
    "sm, fp8, int8_tc, bf16",
    [
        (90, True, True, True),
        (89, True, True, True),
        (86, False, True, True),
        (80, False, True, True),
        (75, False, False, False),
    ],
)
def test_gpu_capabilities(sm, fp8, int8_tc, bf16):
    hw = Hardware(device="cuda", name="GPU", memory_bytes=80 << 30, sm=sm, count=2)
    assert (hw.supports_fp8, hw.supports_int8_tc, hw.supports_bf16) == (fp8, int8_tc, bf16)
    assert hw.total_memory_bytes == 160 << 30
    assert f"SM {sm}" in hw.describe() and "2x GPU" in hw.describe()


def test_cpu_capabilities():
    plain = Hardware(device="cpu", name="old", memory_bytes=8 << 30, cpu_flags=frozenset({"avx2"}))
    amx = Hardware(device="cpu", name="spr", memory_bytes=8 << 30, cpu_flags=frozenset({"avx2", "amx_bf16"}))
    assert not plain.supports_bf16 and amx.supports_bf16
    assert not amx.supports_fp8 and not amx.supports_int8_tc


def test_cuda_detection_through_torch(monkeypatch):
    from types import SimpleNamespace

    from engines import hardware

    props = SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=81559 << 20, major=9, minor=0)
    fake_torch = SimpleNamespace(
        cuda=SimpleNamespace(get_device_properties=lambda index: props, device_count=lambda: 8)
    )
    monkeypatch.setitem(__import__("sys").modules, "pynvml", None)  # NVML absent: torch alone answers
    hw = hardware._detect_cuda(fake_torch)
    assert (hw.device, hw.name, hw.sm, hw.count, hw.memory_bytes) == ("cuda", props.name, 90, 8, 81559 << 20)
    assert hw.driver_version is None and hw.supports_fp8
    assert hw.describe().startswith("cuda: 8x NVIDIA H100 80GB HBM3 (SM 90, 79.6 GiB each")
