"""Dense (unquantized) linear layers, and which matmul they run by weight dtype, device and rows per step.

bf16 weights on a CPU with avx512_bf16: decode-sized steps (at most SMALL_M_MAX rows) use kiln's
weight-streaming kernel, which reads weights at ~2x F.linear's rate (bench/kernel_bf16_linear.py);
larger steps (prefill, big batches) are compute-bound and go to F.linear (oneDNN).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class LinearDispatch:
    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.small_m_max = 0
        self.small: LinearFn = F.linear
        if dtype == torch.bfloat16 and device.type == "cpu":
            from engines.torch.kernels import bf16_linear as kernel

            if kernel.available():  # compiles once (~30 s), then loads from torch's extension cache
                self.small_m_max = kernel.SMALL_M_MAX
                self.small = kernel.bf16_linear

    def for_rows(self, rows: int) -> LinearFn:
        return self.small if rows <= self.small_m_max else F.linear


class DenseLinear(nn.Module):
    """y = x W^T (+ b) for x [T, K] with W [N, K] in the model's dtype; the matmul is picked per call
    by the number of rows (LinearDispatch). The weight may be shared (tied LM head = embeddings)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dispatch: LinearDispatch):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.dispatch = dispatch
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @property
    def weight_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dispatch.for_rows(x.shape[0])(x, self.weight, self.bias)
