"""Row-wise argmax of float32 CPU logits (argmax.cpp): torch.argmax(x, dim=-1), faster.

Greedy decoding takes one argmax per sequence per step; torch's is a visible share of a batch-32 decode
step over a 49k vocabulary (docs/performance.md). Compiled on first use like the other kernels (cached in
TORCH_EXTENSIONS_DIR); other devices,
dtypes and shapes, or a failed build (one warning), use torch.argmax.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engines.torch.kernels.isa_variants import IsaVariants

_SOURCE = Path(__file__).with_name("argmax.cpp")
_EXT = IsaVariants("kiln_argmax", _SOURCE, ["-O3", "-fopenmp"], ldflags=["-fopenmp"], fallback="torch.argmax")


def available() -> bool:
    return _EXT.available()


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """[R, V] -> [R] int64: the index of each row's maximum (its first occurrence; a NaN counts as the maximum)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] > 0:
        ext = _EXT.get()
        if ext is not None:
            return ext.argmax_rows(x)
    return x.argmax(dim=-1)
