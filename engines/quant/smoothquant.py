"""SmoothQuant: migrate activation outliers into the weights, then W8A8 (int8 weights and activations).

Per input channel j, s_j = max|X_j|^alpha / max|W_j|^(1-alpha). The preceding op (RMSNorm weight)
is divided by s and every linear reading that input is multiplied by s along K, so X W^T is unchanged
in exact arithmetic while X/s has a flatter range that per-token int8 represents well.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_MIN_SCALE = 1e-5


def _as_list(weights: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [weights] if isinstance(weights, torch.Tensor) else list(weights)


def smooth_scales(act_amax: torch.Tensor, weights: torch.Tensor | Sequence[torch.Tensor],
                  alpha: float = 0.5) -> torch.Tensor:
    """s [K] from per-channel activation amax [K] and weight(s) [N, K] sharing that input."""
    ws = _as_list(weights)
    # w_amax: [K], max over every output row of every linear fed by this input
    w_amax = torch.stack([w.detach().abs().float().amax(0) for w in ws]).amax(0)
    a = act_amax.float().to(w_amax.device).clamp(min=_MIN_SCALE)
    s = a.pow(alpha) / w_amax.clamp(min=_MIN_SCALE).pow(1 - alpha)
    return s.clamp(min=_MIN_SCALE)


def apply_smoothing(norm_weight: torch.Tensor, weights: torch.Tensor | Sequence[torch.Tensor],
                    s: torch.Tensor):
    """Fold s: returns (norm_weight / s, weight(s) * s along K), same structure as `weights`."""
    s = s.to(norm_weight.device)
    new_norm = (norm_weight.float() / s).to(norm_weight.dtype)
    scaled = [(w.float() * s.to(w.device)).to(w.dtype) for w in _as_list(weights)]
    return new_norm, scaled[0] if isinstance(weights, torch.Tensor) else scaled


def quantize_w8a8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: w [N, K] -> (int8 [N, K], float32 scales [N])."""
    scales = (w.detach().abs().float().amax(1) / 127).clamp(min=1e-10)
    q = torch.round(w.float() / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dynamic_quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8: x [M, K] -> (int8 [M, K], float32 scales [M, 1])."""
    scales = (x.detach().abs().float().amax(-1, keepdim=True) / 127).clamp(min=1e-10)
    q = torch.round(x.float() / scales).clamp(-127, 127).to(torch.int8)
    return q, scales


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
