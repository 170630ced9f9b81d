"""GPTQ: quantize a linear column by column, pushing each column's error onto the not-yet-quantized
columns through the inverse Hessian of the layer's reconstruction loss (Frantar et al., 2022).

Follows the reference implementation: H = 2 X^T X / n, dead columns (zero diagonal) set to zero with
H_jj = 1, damping `percdamp` x mean(diag H), the upper Cholesky factor of H^-1, blocks of `blocksize`
columns with the error of a whole block propagated to the rest lazily, optional act_order (columns in
descending diag(H) order), and group parameters computed from the current (error-updated) weights when
the quantizer enters each group.
"""

from __future__ import annotations

import torch

from engines.quant.rtn import compute_qparams, qrange, quantize_codes
from engines.quant.types import QuantizedWeight


def hessian(x: torch.Tensor) -> torch.Tensor:
    """H = 2 X^T X / n in float32 for calibration inputs x [..., K] -> [K, K]."""
    x = x.reshape(-1, x.shape[-1]).float()
    return 2.0 * (x.t() @ x) / x.shape[0]


@torch.no_grad()
def gptq_quantize(
    w: torch.Tensor,
    x: torch.Tensor | None = None,
    *,
    h: torch.Tensor | None = None,
    bits: int = 4,
    group_size: int | None = 128,
    symmetric: bool = False,
    act_order: bool = False,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> QuantizedWeight:
    """GPTQ-quantize w [N, K] given calibration inputs x [n, K] (or a precomputed Hessian h [K, K]).

    With act_order and groups the groups follow the permuted order, so the result carries g_idx
    (group of each original column), as GPTQ checkpoints do.
    """
    n_rows, k = w.shape
    if group_size is not None and (group_size <= 0 or k % group_size != 0):
        raise ValueError(f"group_size {group_size} must be a positive divisor of in_features K={k}")
    if h is None:
        if x is None:
            raise ValueError("pass calibration inputs x or a Hessian h")
        h = hessian(x.to(w.device))
    h = h.to(device=w.device, dtype=torch.float32).clone()
    w_work = w.float().clone()  # [N, K], updated in place as errors propagate

    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w_work[:, dead] = 0

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w_work = w_work[:, perm]
        h = h[perm][:, perm]

    damp = percdamp * torch.mean(torch.diag(h))
    h += damp * torch.eye(k, device=h.device, dtype=h.dtype)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    codes = torch.zeros_like(w_work)  # integer codes in permuted column order
    g = k if group_size is None else group_size
    n_groups = k // g
    scales = torch.zeros(n_rows, n_groups, device=w.device)
    zeros = None if symmetric else torch.zeros(n_rows, n_groups, device=w.device)
    scale = zero = None
    if group_size is None:
        scale, zero = compute_qparams(w_work, bits, symmetric)  # per-channel: from the whole (damped) row
        scales[:, 0] = scale
        if zeros is not None:
            zeros[:, 0] = zero

    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1 = w_work[:, i1:i2].clone()  # [N, B]
        err1 = torch.zeros_like(w1)
        h_inv1 = h_inv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if group_size is not None and col % group_size == 0:
                # the group's weights as they stand now: updated inside this block, lazily outside it
                group_w = torch.cat([w1[:, i:], w_work[:, i2:]], dim=1)[:, :group_size]
                scale, zero = compute_qparams(group_w, bits, symmetric)
                scales[:, col // group_size] = scale
                if zeros is not None:
                    zeros[:, col // group_size] = zero
            wc = w1[:, i]
            q = quantize_codes(wc, scale, zero, bits)
            codes[:, col] = q
            deq = (q - zero) * scale if zero is not None else q * scale
            d = h_inv1[i, i]
            e = (wc - deq) / d
            w1[:, i:] -= e.unsqueeze(1) @ h_inv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w_work[:, i2:] -= err1 @ h_inv[i1:i2, i2:]

    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        if group_size is not None:
            # column perm[j] was quantized j-th, so it belongs to group j // group_size
            g_idx = (torch.arange(k, device=w.device) // group_size)[inv].to(torch.int32)
    lo, hi = qrange(bits)
    return QuantizedWeight(
        qweight=codes.clamp(lo, hi).to(torch.int8),
        scales=scales,
        zeros=None if zeros is None else zeros.to(torch.int8),
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
        g_idx=g_idx,
    )
