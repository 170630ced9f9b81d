"""Affine int4 weights, w = d * u + m per group (u in [0, 15]): GGUF's Q4_1 blocks served as the file stores them.

Why: the embedded default model ships as a Q4_1 GGUF file, so its "dense" weights are these codes, dequantized.
Serving the codes themselves reads 5 bits per weight a step (4-bit codes plus a float16 (d, m) pair per 32 weights)
instead of 8 (int8) or 16 (bf16), and loses nothing: the layer computes with exactly the weights transformers reads
from the file (float32), or with those rounded to bf16 (a bf16 layer, the same rounding the dense bf16 model makes).

With bf16 x on a CPU with AVX512-BF16 every row, decode or prompt, goes through kernels/panel_linear.py: the codes in
a second layout of 16-row panels (derived at load, 5 bits per weight again), multiplied as they are, the weights
unrounded (the float32 values transformers reads from the file), faster than both alternatives below from one row to
hundreds (docs/performance.md). It is batch-invariant, so a token is computed bit for bit the same whatever its step
holds: prompt whole or chunked or after a prefix-cache hit, decode alone or among 32. On a CPU with AMX the prompt rows
instead keep the dequantized GEMM (oneDNN on AMX tiles), and the step routes rows as below.

Elsewhere (float32 x; CPUs without AVX512-BF16, as KILN_CPU_ISA's lower levels) decode rows (at most
int_linear.SMALL_M_MAX_INT4 of them) run kiln's int4 kernel, which decodes each group's 16 values d * u + m into a
table (int_gemv.cpp); prompt rows, and decode rows past that many, dequantize the layer once per call and run one
F.linear. Both paths multiply by the same weights but sum in different orders, so which rows are which comes from the
step (engines/torch/step_rows.py), not from how many there are: a prompt's tokens are computed the same way whether it
ran whole, in chunks or after a prefix-cache hit. Where the rows are not a step's (the build's layer runs), the row
count decides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engines.torch import step_rows
from engines.torch.kernels import amx_linear, int_linear, panel_linear

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


class AffineInt4Linear(nn.Module):
    def __init__(self, packed: torch.Tensor, dm: torch.Tensor, group_size: int, bias: torch.Tensor | None = None):
        """packed: int_linear.pack_int4 of (u - 8), uint8 [N, Kp / 2]; dm: float16 (d, m) per group,
        [N, K / group_size, 2]."""
        super().__init__()
        if (
            packed.dtype != torch.uint8
            or packed.dim() != 2
            or dm.dtype != torch.float16
            or dm.dim() != 3
            or dm.shape[-1] != 2
        ):
            raise ValueError("AffineInt4Linear needs packed uint8 [N, Kp/2] and float16 dm [N, K/g, 2]")
        n, groups = dm.shape[0], dm.shape[1]
        if packed.shape[0] != n:
            raise ValueError(f"packed has {packed.shape[0]} rows, dm {n}")
        self.out_features, self.in_features, self.group_size = n, groups * group_size, group_size
        if self.in_features > packed.shape[1] * 2:
            raise ValueError(f"{groups} groups of {group_size} exceed the {packed.shape[1] * 2} packed columns")
        self.register_buffer("packed", packed.contiguous())
        self.register_buffer("dm", dm.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.small_m_max = (
            int_linear.SMALL_M_MAX_INT4
            if packed.device.type == "cpu"
            and int_linear.available()
            and int_linear.int4_group_ok(group_size, self.in_features)
            else 0
        )
        # bf16 x on an AVX512-BF16 CPU: every row through panel_linear (its own layout of the codes, derived)
        panels = (
            panel_linear.pack_q4_1(int_linear.unpack_int4(packed, self.in_features).add(8).to(torch.uint8), dm)
            if packed.device.type == "cpu"
            and panel_linear.fits_q4_1(n, self.in_features, group_size)
            and panel_linear.available()
            else (None, None)
        )
        self.register_buffer("panel_codes", panels[0], persistent=False)
        self.register_buffer("panel_dm", panels[1], persistent=False)
        # on an AMX CPU oneDNN runs a prompt's bf16 GEMM on AMX tiles, which the panels (AVX512-BF16) do not match:
        # there prompt rows keep the dequantized GEMM and only decode rows take the panels, routed by the step
        self.prompts_on_amx = self.panel_codes is not None and amx_linear.available()

    @property
    def weight_bytes(self) -> int:
        panels = 0 if self.panel_codes is None else self.panel_codes.numel() + self.panel_dm.numel() * 2
        return self.packed.numel() + self.dm.numel() * 2 + panels

    def dequantized_weight(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        """[N, K] weight d * u + m in `dtype` (float32: the values transformers reads from the GGUF file)."""
        return int_linear.int4_affine_dequantize(self.packed, self.dm, self.group_size, self.in_features, dtype, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.panel_codes is not None and x.dtype == torch.bfloat16 and x.is_cpu and x.numel():
            if self.prompts_on_amx:
                return step_rows.route(x, self.in_features, self.small_m_max, self._panels, self._dequantized_linear)
            return self._panels(x)
        if self.small_m_max and x.is_cpu and x.dtype in _KERNEL_DTYPES and x.numel():
            return step_rows.route(x, self.in_features, self.small_m_max, self._kernel, self._dequantized_linear)
        return self._dequantized_linear(x)

    def _panels(self, x: torch.Tensor) -> torch.Tensor:
        return panel_linear.q4_1_linear(x, self.panel_codes, self.panel_dm, self.bias)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return int_linear.int4_affine_linear(x, self.packed, self.dm, self.group_size, self.bias)

    def _dequantized_linear(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if x.dtype in _KERNEL_DTYPES else torch.float32
        w = self.dequantized_weight(dtype)
        y = F.linear(x.to(dtype), w, None if self.bias is None else self.bias.to(dtype))
        return y.to(x.dtype)
