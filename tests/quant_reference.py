"""Numerical oracles of the quantized linears: plain float32 / exact-integer versions of what the
runtime kernels (engines/torch/layers/quantized.py) compute, for the tests to compare against."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engines.quant.fp8 import FP8_DTYPE, FP8_MAX
from engines.quant.smoothquant import dynamic_quantize_per_token


def dequantize_fp8(w_fp8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return w_fp8.float() * scale


def activation_scale(amax: float | torch.Tensor) -> torch.Tensor:
    """Static per-tensor activation scale from a calibrator's amax (minmax, percentile or entropy)."""
    return (torch.as_tensor(amax, dtype=torch.float32) / FP8_MAX).clamp(min=1e-12)


def quantize_fp8_activation(x: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor FP8 activation: values beyond the calibrated amax saturate at ±448 (e4m3fn has no inf)."""
    return (x.float() / x_scale.to(x.device)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fp8_linear_reference(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, x_scale: torch.Tensor
) -> torch.Tensor:
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


def _as_list(weights: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [weights] if isinstance(weights, torch.Tensor) else list(weights)


def apply_smoothing(norm_weight: torch.Tensor, weights: torch.Tensor | Sequence[torch.Tensor], s: torch.Tensor):
    """Fold s: returns (norm_weight / s, weight(s) * s along K), same structure as `weights`."""
    s = s.to(norm_weight.device)
    new_norm = (norm_weight.float() / s).to(norm_weight.dtype)
    scaled = [(w.float() * s.to(w.device)).to(w.dtype) for w in _as_list(weights)]
    return new_norm, scaled[0] if isinstance(weights, torch.Tensor) else scaled


def _int_mm_ok(x: torch.Tensor, m: int, k: int, n: int) -> bool:
    # torch._int_mm's own constraints (CPU and CUDA): M > 16, K and N multiples of 8
    return m > 16 and k % 8 == 0 and n % 8 == 0 and x.device.type in ("cpu", "cuda")


def int8_matmul(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """int32 [M, N] = xq [M, K] @ wq[N, K]^T, exact."""
    m, k = xq.shape
    n = wq.shape[0]
    if _int_mm_ok(xq, m, k, n):
        return torch._int_mm(xq, wq.t())
    if xq.device.type == "cpu":
        return xq.to(torch.int32) @ wq.t().to(torch.int32)
    # CUDA has no integer matmul: float64 is exact while K * 127^2 < 2^53
    return torch.round(xq.double() @ wq.t().double()).to(torch.int32)


def w8a8_linear_reference(x: torch.Tensor, qw: torch.Tensor, w_scales: torch.Tensor) -> torch.Tensor:
    """y = x W^T with W = qw * w_scales[:, None] and x quantized per token on the fly. x: [..., K]."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # x2: [M, K]
    xq, xs = dynamic_quantize_per_token(x2)
    acc = int8_matmul(xq, qw)  # acc: [M, N] int32
    y = acc.float() * xs * w_scales.float().reshape(1, -1)
    return y.to(x.dtype).reshape(*lead, qw.shape[0])
