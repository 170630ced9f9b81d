"""Inputs and the accuracy check shared by the bf16 linear kernel tests (AVX-512 bf16_linear, AMX amx_linear)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bf16_inputs(m: int, n: int, k: int, seed: int, bias: bool):
    """x [m, k], w [n, k] (scaled like trained weights) and an optional bias [n], all bf16, seeded."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    return x, w, b


def check_bf16_linear(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """y must be bf16 F.linear(x, w, b) computed in fp32 and rounded once (w may be an fp32 dequantized weight)."""
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    # The brief's tolerance: rtol 1e-2 and atol 1e-2 of the outputs' typical magnitude.
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().mean().item() + 1e-6)
    # Tighter: one rounding to bf16 (<= 2^-8 relative) plus fp32 accumulation-order error, which is
    # bounded by a small multiple of 2^-24 * K * sum|x*w| -- 1e-5 * sum|x*w| is generous for K <= 1536.
    bound = 2.0**-8 * ref.abs() + 1e-5 * F.linear(x.float().abs(), w.float().abs()) + 1e-30
    excess = ((y.float() - ref).abs() - bound).max().item()
    assert excess <= 0, f"error exceeds one bf16 rounding by {excess}"
