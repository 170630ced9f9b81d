"""SwiGLU's `silu(gate) * up` for bf16 or fp32 activations on CPU in one op (silu_mul.cpp), rounded like torch.

F.silu on the gate half and a multiply by the up half of the fused gate_up projection are two strided
passes, a visible share of a prefill step (docs/performance.md); the kernel reads each row once. Compiled on first
use like rms_norm
(cached in TORCH_EXTENSIONS_DIR); `silu_mul` falls back to torch on other dtypes or devices and when
the extension cannot be built (one warning). AVX-512 or AVX2 builds of one source (isa_variants.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from engines.torch.kernels.isa_variants import IsaVariants

_SOURCE = Path(__file__).with_name("silu_mul.cpp")
_EXT = IsaVariants("kiln_silu_mul", _SOURCE, ["-O3", "-fopenmp"], ldflags=["-fopenmp"], fallback="F.silu(gate) * up")


def available() -> bool:
    return _EXT.available()


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] -> [T, I]: silu of the first half times the second half of each row."""
    if gate_up.dtype in (torch.bfloat16, torch.float32) and gate_up.device.type == "cpu" and gate_up.dim() == 2:
        ext = _EXT.get()
        if ext is not None:
            return ext.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
