"""AWQ (activation-aware weight quantization) for one linear or a group of linears sharing an input.

1. Scale search: s = s_x^alpha with s_x = mean|X_j|, normalised by sqrt(max(s) * min(s)); for each
   alpha on the grid i / n_grid (i = 0..n_grid-1, as in the reference), quantize W diag(s) group-wise
   and keep the alpha minimising ||X W^T - (X / s) Q(W diag(s))^T||^2 over all linears.
2. Clip search: per output row and group, shrink the range of W diag(s) by 1.0, 0.95, ..., 0.5 and keep
   the factor minimising that group's contribution to the same output error.

The caller folds 1/s into the op producing X (e.g. divides the RMSNorm weight by s) and stores the
returned QuantizedWeight(s), which encode W diag(s).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engines.quant.rtn import _grouped, fake_quantize, quantize_rtn
from engines.quant.types import QuantizedWeight


@dataclass
class AWQResult:
    scales: torch.Tensor  # s [K] float32: divide the producer of X by s
    qweights: list[QuantizedWeight]  # one per input weight, each quantizing W * s
    alpha: float
    clip_ratios: list[torch.Tensor]  # per weight, [N, K // group_size] (or [N, 1]) chosen shrink factors


def _output_error(gram: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||X (W - W_hat)^T||^2 computed as sum((D X^T X) * D): with the Gram matrix [K, K] built once,
    each candidate costs N*K*K instead of n*N*K (n samples) and no [n, N] product is materialised."""
    d = w - w_hat  # [N, K]
    return float(((d @ gram) * d).sum())


def search_scale(
    x: torch.Tensor, w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, n_grid: int = 20
) -> tuple[torch.Tensor, float]:
    """Best s [K] and alpha for x [n, K], w [N_total, K] (all linears stacked along N)."""
    s_x = x.abs().mean(0)  # [K]
    gram = x.t() @ x  # [K, K]
    best_err, best_s, best_alpha = float("inf"), None, 0.0
    for i in range(n_grid):
        alpha = i / n_grid
        s = s_x.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        # (x / s) Q(w s)^T == x (Q(w s) / s)^T: compare effective weights in the original basis
        w_hat = fake_quantize(w * s, bits, group_size, symmetric) / s
        err = _output_error(gram, w, w_hat)
        if err < best_err:
            best_err, best_s, best_alpha = err, s, alpha
    return best_s, best_alpha


def search_clip(
    x: torch.Tensor,
    w: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    max_shrink: float = 0.5,
    n_grid: int = 20,
    max_chunk_elems: int = 1 << 24,
) -> torch.Tensor:
    """Per (row, group) shrink factor [N, G] minimising sum_samples (x_g . (w_g - Q_r(w_g)))^2."""
    wg = _grouped(w, group_size)  # [N, G, g]
    n_rows, n_groups, g = wg.shape
    xg = x.reshape(x.shape[0], n_groups, g)  # [n, G, g]
    # sum_samples (x_g . d_g)^2 = d_g^T (X_g^T X_g) d_g: one Gram matrix per group, built once
    gram = torch.einsum("nGg,nGh->Ggh", xg, xg)  # [G, g, g]
    ratios = [1.0 - i / n_grid for i in range(int(max_shrink * n_grid) + 1)]
    best_ratio = torch.ones(n_rows, n_groups, device=w.device)
    best_err = torch.full((n_rows, n_groups), float("inf"), device=w.device)
    rows_per_chunk = max(1, max_chunk_elems // max(1, n_groups * g))
    for r in ratios:
        w_hat = fake_quantize(w, bits, group_size, symmetric, clip_ratio=r).reshape(wg.shape)
        for r0 in range(0, n_rows, rows_per_chunk):
            d = wg[r0 : r0 + rows_per_chunk] - w_hat[r0 : r0 + rows_per_chunk]  # [rows, G, g]
            err = (torch.einsum("NGg,Ggh->NGh", d, gram) * d).sum(-1)  # [rows, G]
            better = err < best_err[r0 : r0 + rows_per_chunk]
            best_err[r0 : r0 + rows_per_chunk] = torch.where(better, err, best_err[r0 : r0 + rows_per_chunk])
            best_ratio[r0 : r0 + rows_per_chunk] = torch.where(better, r, best_ratio[r0 : r0 + rows_per_chunk])
    return best_ratio


@torch.no_grad()
def awq_quantize(
    x: torch.Tensor,
    weights: torch.Tensor | Sequence[torch.Tensor],
    bits: int = 4,
    group_size: int | None = 128,
    symmetric: bool = False,
    n_grid: int = 20,
    clip: bool = True,
) -> AWQResult:
    """AWQ for calibration inputs x [..., K] and weight(s) [N_i, K] that all read x."""
    ws = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    k = ws[0].shape[1]
    x = x.reshape(-1, k).float().to(ws[0].device)  # x: [n, K]
    w_all = torch.cat([w.float() for w in ws], 0)  # w_all: [sum N_i, K]
    _grouped(w_all, group_size)  # validates group_size before the search
    s, alpha = search_scale(x, w_all, bits, group_size, symmetric, n_grid)
    x_s = x / s
    qweights, clip_ratios = [], []
    for w in ws:
        w_s = w.float() * s
        ratio = (
            search_clip(x_s, w_s, bits, group_size, symmetric, n_grid=n_grid)
            if clip
            else torch.ones(w.shape[0], 1 if group_size is None else k // group_size, device=w.device)
        )
        qweights.append(quantize_rtn(w_s, bits, group_size, symmetric, clip_ratio=ratio))
        clip_ratios.append(ratio)
    return AWQResult(scales=s, qweights=qweights, alpha=alpha, clip_ratios=clip_ratios)
