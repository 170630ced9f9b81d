"""RMSNorm for bf16 activations on CPU in one op (rms_norm.cpp), with Hugging Face's rounding.

F.rms_norm on a bf16 CPU tensor runs ~10 small ops; a decode step calls it 2 * layers + 1 times,
so it cost about as much as attention (docs/performance.md). Compiled on first use like
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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * x / sqrt(mean(x^2) + eps) over the last dim; bf16 CPU tensors take the kernel."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and weight.dtype == torch.bfloat16:
        ext = _EXT.get()
        if ext is not None:
            return ext.rms_norm_bf16(x, weight, eps)
    return F.rms_norm(x, weight.shape, weight, eps)


def add_rms_norm(
    x: torch.Tensor, d: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + d, rms_norm(x + d, weight, eps)): the residual add before a norm, fused for bf16 CPU tensors and
    bit-identical to the two ops."""
    if (
        x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and d.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and x.shape == d.shape
    ):
        ext = _EXT.get()
        if ext is not None:
            return ext.add_rms_norm_bf16(x, d, weight, eps)
    x = x + d
    return x, rms_norm(x, weight, eps)
