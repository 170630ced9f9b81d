"""RMSNorm for bf16 or fp32 activations on CPU in one op (rms_norm.cpp), with Hugging Face's rounding.

F.rms_norm on a bf16 CPU tensor runs ~10 small ops; a decode step calls it 2 * layers + 1 times,
so it cost about as much as attention (docs/performance.md). fp32 (the dtype on CPUs without native bf16) takes
the kernel too: one pass, fused with the residual add before it. Compiled on first use like
bf16_linear (g++ and ninja; cached in TORCH_EXTENSIONS_DIR). `rms_norm` falls back to F.rms_norm
on other dtypes or devices and when the extension cannot be built (one warning).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from engines.torch.kernels.isa_variants import IsaVariants

_SOURCE = Path(__file__).with_name("rms_norm.cpp")
_EXT = IsaVariants("kiln_rms_norm", _SOURCE, ["-O3", "-fopenmp"], ldflags=["-fopenmp"], fallback="F.rms_norm")


def available() -> bool:
    return _EXT.available()


KERNEL_DTYPES = (torch.bfloat16, torch.float32)


def _takes(*tensors: torch.Tensor) -> bool:
    """The kernel applies: CPU tensors of one dtype it has rows for. (A plain loop over is_cpu: this runs twice per
    layer and step, and a generator over t.device.type cost several microseconds a call.)"""
    dtype = tensors[0].dtype
    if dtype not in KERNEL_DTYPES:
        return False
    for t in tensors:
        if t.dtype != dtype or not t.is_cpu:
            return False
    return True


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * x / sqrt(mean(x^2) + eps) over the last dim; bf16 and fp32 CPU tensors take the kernel."""
    if _takes(x, weight):
        ext = _EXT.get()
        if ext is not None:
            return ext.rms_norm(x, weight, eps)
    return F.rms_norm(x, weight.shape, weight, eps)


def add_rms_norm(
    x: torch.Tensor, d: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + d, rms_norm(x + d, weight, eps)): the residual add before a norm, fused for bf16 and fp32 CPU tensors
    and bit-identical to the two ops."""
    if _takes(x, d, weight) and x.shape == d.shape:
        ext = _EXT.get()
        if ext is not None:
            return ext.add_rms_norm(x, d, weight, eps)
    x = x + d
    return x, rms_norm(x, weight, eps)
