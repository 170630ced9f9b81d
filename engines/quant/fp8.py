"""FP8 E4M3 (torch.float8_e4m3fn) weights.

scale = amax / 448 (E4M3's largest finite value), so w / scale spans the full FP8 range. The float32
reference of the FP8 linear (what Fp8Linear's tensor-core path is checked against) is in
tests/quant_reference.py.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0


def _to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # clamp first: values past 448 would otherwise become NaN (e4m3fn has no inf)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_fp8(w: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (fp8 [N, K], float32 scales [N, 1] per channel or a 0-d tensor per tensor)."""
    a = w.detach().abs().float()
    amax = a.amax(dim=1, keepdim=True) if per_channel else a.amax()
    scale = (amax / FP8_MAX).clamp(min=1e-12)
    return _to_fp8(w, scale), scale
