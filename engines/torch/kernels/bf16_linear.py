"""bf16 x bf16 -> bf16 linear for decode-sized batches (M = 1..SMALL_M_MAX), fp32 accumulation.

At small M a linear layer is bound by reading its weight from memory; F.linear's bf16 path streams
weights well below the machine's read bandwidth. The C++ kernel beside this file (bf16_gemv.cpp)
reads each weight once per call with AVX-512 BF16 dot products (vdpbf16ps) over all M rows of x.
Weights stay in their usual [N, K] layout: no pre-packing.

The extension is compiled on first use with torch.utils.cpp_extension.load (needs g++ and ninja on
PATH; ~30 s once, then cached in torch's extension directory and loaded in about a second).
`available()` is False when the CPU lacks avx512_bf16 or the build fails (one log line, no raise);
`bf16_linear` then falls back to F.linear, so callers may call it unconditionally.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("kiln.kernels")

# Largest M for which bf16_linear beats F.linear (bench/kernel_bf16_linear.py); above it use F.linear.
SMALL_M_MAX = 8

_SOURCE = Path(__file__).with_name("bf16_gemv.cpp")
_lock = threading.Lock()
_ext = None
_tried = False


def _cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512_bf16" in line.split()
    except OSError:
        pass
    return False


def _load():
    global _ext, _tried
    if _tried:
        return _ext
    with _lock:
        if _tried:
            return _ext
        try:
            if not _cpu_has_avx512_bf16():
                raise RuntimeError("CPU lacks avx512_bf16")
            from torch.utils.cpp_extension import load

            # Explicit ISA flags, not -march=native: the cached binary stays valid on any avx512_bf16 CPU.
            _ext = load(
                name="kiln_bf16_gemv",
                sources=[str(_SOURCE)],
                extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as e:  # no compiler, no ninja, unsupported CPU...: fall back to F.linear
            log.warning("bf16_linear kernel unavailable, using F.linear: %s", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            _ext = None
        _tried = True
        return _ext


def available() -> bool:
    """True when the compiled kernel can be used (builds it on first call)."""
    return _load() is not None


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for bf16 x [..., K] and contiguous bf16 weight [N, K], bf16 result,
    fp32 accumulation, rounded once. Meant for x with at most SMALL_M_MAX rows."""
    ext = _ext if _tried else _load()
    if ext is None or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or not weight.is_contiguous():
        return F.linear(x, weight, bias)
    return ext.bf16_linear(x, weight, bias)
