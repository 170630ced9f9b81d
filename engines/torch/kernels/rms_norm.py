"""RMSNorm for bf16 activations on CPU in one op (rms_norm.cpp), with Hugging Face's rounding.

F.rms_norm on a bf16 CPU tensor runs ~10 small ops (~50 us per 576-wide row); a decode step calls
it 2 * layers + 1 times, so it cost about as much as attention. Compiled on first use like
bf16_linear (g++ and ninja; cached in TORCH_EXTENSIONS_DIR). `rms_norm` falls back to F.rms_norm
on other dtypes or devices and when the extension cannot be built (one warning).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("kiln.kernels")

_SOURCE = Path(__file__).with_name("rms_norm.cpp")
_lock = threading.Lock()
_ext = None
_tried = False


def _load():
    global _ext, _tried
    with _lock:
        if not _tried:
            try:
                from torch.utils.cpp_extension import load

                _ext = load(name="kiln_rms_norm", sources=[str(_SOURCE)], extra_cflags=["-O3"], verbose=False)
            except Exception as e:  # no compiler, no ninja...
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                log.warning("rms_norm kernel unavailable, F.rms_norm is used instead: %s", first)
                _ext = None
            _tried = True
    return _ext


def available() -> bool:
    return (_ext if _tried else _load()) is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * x / sqrt(mean(x^2) + eps) over the last dim; bf16 CPU tensors take the kernel."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and weight.dtype == torch.bfloat16:
        ext = _ext if _tried else _load()
        if ext is not None:
            return ext.rms_norm_bf16(x, weight, eps)
    return F.rms_norm(x, weight.shape, weight, eps)
