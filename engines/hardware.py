"""What machine kiln runs on: CUDA GPUs (through torch, enriched by NVML when nvidia-ml-py is
installed) or else the CPU (model, ISA flags that matter for kernels, cores, memory).

`detect()` reads the real machine; everything downstream (profile selection, planning) takes a
`Hardware` value, so tests build one directly to stand for an H100 or a small CPU box.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engines import cpu_isa

# The CPU features kiln's kernels and profiles care about, in /proc/cpuinfo spelling: those of the ISA levels
# (engines/cpu_isa.py), level by level.
CPU_FLAGS_OF_INTEREST = tuple(flag for level in cpu_isa.LEVELS for flag in sorted(level.flags))
# The few that tell CPU classes apart, for one-line descriptions.
DESCRIBED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_int8")

GiB = 1 << 30


@dataclass(frozen=True)
class Hardware:
    device: str  # "cuda" or "cpu"
    name: str  # GPU name (device 0) or CPU model name
    memory_bytes: int  # per GPU on cuda; usable RAM on cpu
    count: int = 1  # GPUs on cuda; 1 on cpu
    sm: int | None = None  # compute capability as major * 10 + minor (90 for H100); None on cpu
    # subset of CPU_FLAGS_OF_INTEREST, after KILN_CPU_ISA's restriction (engines/cpu_isa.py)
    cpu_flags: frozenset[str] = field(default_factory=frozenset)
    cores: int = 1  # CPU cores this process may run on
    driver_version: str | None = None  # NVIDIA driver, when NVML answered

    @property
    def total_memory_bytes(self) -> int:
        return self.memory_bytes * self.count

    @property
    def supports_fp8(self) -> bool:
        """FP8 tensor cores: Ada (SM 89) and Hopper (SM 90) onwards."""
        return self.device == "cuda" and (self.sm or 0) >= 89

    @property
    def supports_int8_tc(self) -> bool:
        """INT8 tensor-core GEMMs fast enough for W8A8 (SmoothQuant): Ampere (SM 80) onwards."""
        return self.device == "cuda" and (self.sm or 0) >= 80

    @property
    def supports_bf16(self) -> bool:
        """Native bf16 math: Ampere GPUs and later, or CPUs with AVX512-BF16 or AMX-BF16."""
        if self.device == "cuda":
            return (self.sm or 0) >= 80
        return cpu_isa.native_bf16(self.cpu_flags)

    @property
    def cpu_level(self) -> str | None:
        """The ISA level of the CPU (engines/cpu_isa.py): avx2, avx512, avx512vnni, avx512bf16, amx; None below."""
        return cpu_isa.level_of(self.cpu_flags)

    def describe(self) -> str:
        if self.device == "cuda":
            driver = f", driver {self.driver_version}" if self.driver_version else ""
            return f"cuda: {self.count}x {self.name} (SM {self.sm}, {self.memory_bytes / GiB:.1f} GiB each{driver})"
        flags = " ".join(flag for flag in DESCRIBED_FLAGS if flag in self.cpu_flags) or "no AVX2, AVX-512 or AMX"
        level = f"{self.cpu_level}: " if self.cpu_level else ""
        return f"cpu: {self.name}, {self.cores} cores, {self.memory_bytes / GiB:.1f} GiB RAM ({level}{flags})"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["cpu_flags"] = sorted(self.cpu_flags)
        data["description"] = self.describe()
        return data


def detect(device: str | None = None) -> Hardware:
    """The hardware of this machine: the visible CUDA GPUs when torch sees any, else the CPU;
    device="cpu" or "cuda" asks for that one (an engine served on the CPU of a GPU machine)."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return _detect_cuda(torch)
    return _detect_cpu()


def _detect_cuda(torch) -> Hardware:
    props = torch.cuda.get_device_properties(0)
    return Hardware(
        device="cuda",
        name=props.name,
        memory_bytes=props.total_memory,
        count=torch.cuda.device_count(),
        sm=props.major * 10 + props.minor,
        cpu_flags=_cpu_flags(),
        cores=_cores(),
        driver_version=_nvml_driver_version(),
    )


def _nvml_driver_version() -> str | None:
    try:  # nvidia-ml-py is optional; torch alone already said everything else
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None
    return version.decode() if isinstance(version, bytes) else str(version)


def _detect_cpu(cpuinfo: str | None = None, meminfo: str | None = None) -> Hardware:
    flags = _cpu_flags(cpuinfo)
    cpuinfo = _read("/proc/cpuinfo") if cpuinfo is None else cpuinfo
    meminfo = _read("/proc/meminfo") if meminfo is None else meminfo
    return Hardware(
        device="cpu",
        name=_cpu_model(cpuinfo),
        memory_bytes=_memory_bytes(meminfo),
        cpu_flags=flags,
        cores=_cores(),
    )


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:  # not Linux: detection degrades to "unknown", it does not fail
        return ""


def _cpuinfo_field(cpuinfo: str, key: str) -> str | None:
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            return value.strip()
    return None


def _cpu_model(cpuinfo: str) -> str:
    import platform

    return _cpuinfo_field(cpuinfo, "model name") or platform.processor() or platform.machine() or "unknown CPU"


def _cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The flags of interest of this CPU (or of `cpuinfo`'s text), restricted by KILN_CPU_ISA."""
    flags = (
        cpu_isa.cpu_flags()
        if cpuinfo is None
        else cpu_isa.restrict(cpu_isa.proc_cpu_flags(cpuinfo), cpu_isa.override())
    )
    return flags & frozenset(CPU_FLAGS_OF_INTEREST)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


def _memory_bytes(meminfo: str) -> int:
    total = 0
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            total = int(line.split()[1]) * 1024  # /proc/meminfo counts kB
    # In a container the cgroup limit, not the host's RAM, is what kiln may use.
    limit = _read("/sys/fs/cgroup/memory.max").strip()
    if limit.isdigit() and (total == 0 or int(limit) < total):
        return int(limit)
    return total
