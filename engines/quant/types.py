"""Containers shared by the quantization algorithms."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    """An integer-quantized nn.Linear weight.

    Invariants:
    - qweight: int8 [N, K], codes in the signed range [-2**(bits-1), 2**(bits-1) - 1] for every mode
      (asymmetric codes are stored shifted by -2**(bits-1) so that 8-bit asymmetric still fits int8;
      the zero points carry the same shift, so (q - z) is unchanged).
    - scales: float32 [N, K // group_size] when group_size is set, else [N, 1] (per output channel).
    - zeros: int8, same shape as scales, or None when symmetric.
    - g_idx: optional int32 [K], group of each input column; only set when the columns were quantized
      out of order (GPTQ act_order), otherwise column k belongs to group k // group_size.
    - dequantized weight = (qweight - zeros[group]) * scales[group].
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int | None
    symmetric: bool
    g_idx: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)
