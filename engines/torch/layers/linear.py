"""Which matmul a dense linear layer runs, by weight dtype, device and rows per step.

bf16 weights on a CPU with avx512_bf16: decode-sized steps (at most SMALL_M_MAX rows) use kiln's
weight-streaming kernel, which reads weights at ~2x F.linear's rate (bench/kernel_bf16_linear.py);
larger steps (prefill, big batches) are compute-bound and go to F.linear (oneDNN).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

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
