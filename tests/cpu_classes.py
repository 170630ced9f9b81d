"""The CPU classes kiln meets, as the /proc/cpuinfo flags a real CPU of each class shows (the ISA-relevant part),
with the level engines/cpu_isa.py must give each. Tests build Hardware values and dispatch decisions from them."""

from __future__ import annotations

from engines.hardware import Hardware

_BASE = {"sse4_2", "avx"}  # every class has these; no level owns them
_AVX2 = _BASE | {"avx2", "fma", "f16c", "bmi2"}
_AVX512 = _AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}
_ICE_LAKE = _AVX512 | {"avx512_vnni", "avx512vbmi", "avx512_vbmi2", "avx512ifma", "avx512_bitalg"}
_ZEN4 = _ICE_LAKE | {"avx512_bf16"}
_SAPPHIRE_RAPIDS = _ZEN4 | {"avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"}

# name: (flags, level)
CPU_CLASSES: dict[str, tuple[frozenset[str], str | None]] = {
    "sandy-bridge (no AVX2)": (frozenset(_BASE), None),
    "zen3 (AVX2)": (frozenset(_AVX2), "avx2"),
    "alder-lake (AVX2 + AVX-VNNI)": (frozenset(_AVX2 | {"avx_vnni"}), "avx2"),
    "skylake-x (AVX-512)": (frozenset(_AVX512), "avx512"),
    "ice-lake (AVX-512 VNNI)": (frozenset(_ICE_LAKE), "avx512vnni"),
    "zen4 (AVX512-BF16)": (frozenset(_ZEN4), "avx512bf16"),
    "sapphire-rapids (AMX)": (frozenset(_SAPPHIRE_RAPIDS), "amx"),
}


def cpu_hardware(flags: frozenset[str], memory_bytes: int = 64 << 30) -> Hardware:
    from engines.hardware import CPU_FLAGS_OF_INTEREST

    return Hardware(
        device="cpu", name="test CPU", memory_bytes=memory_bytes, cpu_flags=flags & frozenset(CPU_FLAGS_OF_INTEREST)
    )
