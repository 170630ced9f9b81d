"""FP8 E4M3 (torch.float8_e4m3fn) weights and static per-tensor activation scales.

scale = amax / 448 (E4M3's largest finite value), so x / scale spans the full FP8 range.
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


def dequantize_fp8(w_fp8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return w_fp8.float() * scale


def activation_scale(amax: float | torch.Tensor) -> torch.Tensor:
    """Static per-tensor activation scale from a calibrator's amax (minmax, percentile or entropy)."""
    return (torch.as_tensor(amax, dtype=torch.float32) / FP8_MAX).clamp(min=1e-12)


def quantize_fp8_activation(x: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor FP8 activation: values beyond the calibrated amax saturate at ±448."""
    return _to_fp8(x, x_scale.to(x.device))


def fp8_linear_reference(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                         x_scale: torch.Tensor) -> torch.Tensor:
    """y = Q(x) W^T computed by upcasting both FP8 operands to float32 (any device, any GPU).

    On CUDA with SM >= 89 (Ada, Hopper) Fp8Linear runs fp8_scaled_mm_linear instead: torch._scaled_mm
    multiplies in FP8 on tensor cores and applies the same scales (a per-channel weight scale needs
    the activation scale expanded to [M, 1]: _scaled_mm takes one scale on both sides or per-row scales
    on both); this function is its numerical reference. x: [..., K], w_fp8: [N, K], w_scale: [N, 1] or scalar.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # x2: [M, K]
    xq = quantize_fp8_activation(x2, x_scale)
    w_scale = w_scale.to(x.device).float()
    y = (xq.float() @ w_fp8.float().t()) * x_scale.to(x.device).float()
    y = y * (w_scale.reshape(1, -1) if w_scale.dim() else w_scale)
    return y.to(x.dtype).reshape(*lead, w_fp8.shape[0])
