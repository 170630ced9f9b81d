"""SmoothQuant: migrate activation outliers into the weights, then W8A8 (int8 weights and activations).

Per input channel j, s_j = max|X_j|^alpha / max|W_j|^(1-alpha). The preceding op (RMSNorm weight)
is divided by s and every linear reading that input is multiplied by s along K, so X W^T is unchanged
in exact arithmetic while X/s has a flatter range that per-token int8 represents well (the folding is
engines/build/quantize.py's, the alpha engines/schemes/int8_sq.py's; the exact-integer reference of the
W8A8 linear is in tests/quant_reference.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_MIN_SCALE = 1e-5


def smooth_scales(act_amax: torch.Tensor, weights: torch.Tensor | Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [K] from per-channel activation amax [K] and weight(s) [N, K] sharing that input."""
    ws = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    # w_amax: [K], max over every output row of every linear fed by this input
    w_amax = torch.stack([w.detach().abs().float().amax(0) for w in ws]).amax(0)
    a = act_amax.float().to(w_amax.device).clamp(min=_MIN_SCALE)
    s = a.pow(alpha) / w_amax.clamp(min=_MIN_SCALE).pow(1 - alpha)
    return s.clamp(min=_MIN_SCALE)


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
