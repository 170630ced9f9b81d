"""Activation-range calibrators: each turns calibration samples into an amax (the clipping threshold).

`samples` is a tensor or a list of tensors (calibration batches) of shape [..., channels].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Samples = torch.Tensor | Sequence[torch.Tensor]


def _flat_abs(samples: Samples) -> torch.Tensor:
    if isinstance(samples, torch.Tensor):
        return samples.detach().abs().float().reshape(-1)
    return torch.cat([s.detach().abs().float().reshape(-1) for s in samples])


def minmax(samples: Samples, per_channel: bool = False) -> float | torch.Tensor:
    """max |x| over everything, or per channel (last dim) as a float32 tensor [C]."""
    if per_channel:
        obs = RangeObserver()
        for s in [samples] if isinstance(samples, torch.Tensor) else samples:
            obs.update(s)
        return obs.amax
    return float(_flat_abs(samples).max())


def percentile(samples: Samples, pct: float = 99.99) -> float:
    """The pct-th percentile of |x| (nearest rank), ignoring the rarest outliers."""
    if not 0 < pct <= 100:
        raise ValueError(f"pct must be in (0, 100], got {pct}")
    x = _flat_abs(samples)
    # kthvalue, not torch.quantile: quantile refuses inputs above 16M elements
    k = max(1, min(x.numel(), math.ceil(pct / 100 * x.numel())))
    return float(x.kthvalue(k).values)


def entropy(samples: Samples, bins: int = 2048, num_quant_bins: int = 128) -> float:
    """TensorRT-style KL calibration: the threshold whose quantized |x| histogram loses least information.

    Builds a `bins`-bin histogram of |x| over [0, max|x|]. For each candidate threshold bin i
    (num_quant_bins..bins) the reference distribution P is hist[:i] with the clipped tail folded into
    its last bin; Q is hist[:i] (tail not folded) merged into num_quant_bins levels and spread back
    uniformly over the non-empty bins, so KL(P || Q) charges both rounding and clipping. Returns the edge of the i
    minimising KL(P || Q). Use num_quant_bins=128 for signed int8
    (|x| uses 7 bits), 255 for unsigned.
    """
    x = _flat_abs(samples)
    amax = float(x.max())
    if amax == 0.0:
        return 0.0
    # float64 on CPU: the search is a few thousand tiny reductions; exactness of the KL matters more than speed
    hist = torch.histc(x, bins=bins, min=0.0, max=amax).double().cpu()
    edges = torch.linspace(0.0, amax, bins + 1, dtype=torch.float64)
    total = hist.sum()
    tail = total - torch.cumsum(hist, 0)  # tail[i-1] = sum(hist[i:])
    best_kl, best_i = math.inf, bins
    for i in range(num_quant_bins, bins + 1):
        p = hist[:i].clone()
        p[i - 1] += tail[i - 1]
        # Q is built from the unclipped bins: the clipped mass is what P has and Q lacks
        h = hist[:i]
        nonzero = h > 0
        merged = i // num_quant_bins
        level = (torch.arange(i) // merged).clamp(max=num_quant_bins - 1)  # leftover bins join the last level
        q_mass = torch.zeros(num_quant_bins, dtype=torch.float64).index_add_(0, level, h)
        q_count = torch.zeros(num_quant_bins, dtype=torch.float64).index_add_(0, level, nonzero.double())
        q = torch.where(nonzero, q_mass[level] / q_count[level].clamp(min=1), torch.zeros_like(h))
        support = p > 0
        pn = p[support] / p.sum()
        qn = _smooth(q[support] / q.sum())
        kl = float((pn * torch.log(pn / qn)).sum())
        if kl < best_kl:
            best_kl, best_i = kl, i
    return float(edges[best_i])


def _smooth(q: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Give empty bins a little mass taken from the others (MXNet/TensorRT smoothing), so KL stays finite.

    Without it every threshold whose last bin is empty (common past a gap before a few outliers) would
    score infinity, and the search could only land on the outliers themselves.
    """
    zero = q == 0
    n_zero = int(zero.sum())
    if n_zero == 0:
        return q
    n_nonzero = q.numel() - n_zero
    if n_nonzero == 0:
        return torch.full_like(q, 1.0 / q.numel())
    return torch.where(zero, torch.full_like(q, eps), q - eps * n_zero / n_nonzero).clamp(min=eps * 1e-3)


class RangeObserver:
    """Streams calibration batches [..., C] and keeps per-channel max|x| and mean|x| (float32, [C]).

    SmoothQuant reads `amax`; AWQ reads `mean_abs`. Statistics stay on the first batch's device.
    """

    def __init__(self) -> None:
        self._amax: torch.Tensor | None = None
        self._abs_sum: torch.Tensor | None = None
        self.count = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        a = x.detach().abs().float().reshape(-1, x.shape[-1])  # [tokens, C]
        if self._amax is None:
            self._amax = a.amax(0)
            self._abs_sum = a.sum(0, dtype=torch.float64)
        else:
            if a.shape[1] != self._amax.shape[0]:
                raise ValueError(f"channel count changed from {self._amax.shape[0]} to {a.shape[1]}")
            a = a.to(self._amax.device)
            self._amax = torch.maximum(self._amax, a.amax(0))
            self._abs_sum += a.sum(0, dtype=torch.float64)
        self.count += a.shape[0]

    @property
    def amax(self) -> torch.Tensor:
        if self._amax is None:
            raise RuntimeError("RangeObserver saw no data")
        return self._amax

    @property
    def mean_abs(self) -> torch.Tensor:
        if self._abs_sum is None:
            raise RuntimeError("RangeObserver saw no data")
        return (self._abs_sum / self.count).float()
