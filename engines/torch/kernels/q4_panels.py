"""GGUF Q4_1 linear for steps of many bf16 rows on AVX512-BF16 CPUs, with the unrounded weights.

The affine int4 layer's other kernels (int_gemv.cpp) keep a weight row's columns in one vector: right for a step of
a few rows, which is bound by reading the weights, but at 32 rows the decode they repeat for every row of x left
them at under half the machine's bf16 dot-product rate (docs/performance.md). q4_panels.cpp keeps 16 weight rows in
a vector instead, decodes each group once per pass of up to 12 rows of x and sums exactly as the single-row kernel's
arithmetic does (sum_g d_g (u_g . x_g) + m_g X_g): exact products, fp32 sums.

`pack` lays a layer's codes out for it once at load (5 bits per weight, as the other layout). Shapes: N a multiple
of 16, groups of 32 (`fits`). `available()` is False without AVX512-BF16 (after KILN_CPU_ISA) or when the build
fails; callers then keep int_gemv's kernels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engines.torch.kernels import extension
from engines.torch.kernels.extension import LazyExtension

PANEL = 16  # weight rows per panel
GROUP = 32

_EXT = LazyExtension(
    "kiln_q4_panels",
    Path(__file__).with_name("q4_panels.cpp"),
    ["-O3", "-ffp-contract=off", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"],
    required_cpu_flags=("avx512f", "avx512bw", "avx512vl", "avx512_bf16"),
    ldflags=["-fopenmp"],
    fallback="int_gemv's kernels",
)


def available() -> bool:
    """True when the kernel can run here (compiles or loads it on the first call). The flags are read on every
    call, as int_linear.bf16_dot does, so a test that withholds AVX512-BF16 turns it off."""
    return set(_EXT.required_cpu_flags) <= extension.cpu_flags() and _EXT.available()


def fits(n: int, k: int, group_size: int) -> bool:
    return group_size == GROUP and n % PANEL == 0 and k % GROUP == 0 and n * k > 0


def _aligned(t: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """A contiguous copy of t whose data starts on an `alignment`-byte boundary (the kernel's aligned loads)."""
    nbytes = t.numel() * t.element_size()
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8)
    offset = (-raw.data_ptr()) % alignment
    out = raw[offset : offset + nbytes].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def pack(u: torch.Tensor, dm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes u (uint8 [N, K], values 0..15) and float16 (d, m) [N, K / 32, 2] -> the kernel's (codes, dm):
    uint8 [N / 16, K / 32, 256] (byte 32 j + 2 i + e of panel nb, group g: row 16 nb + i, columns 32 g + 4 j + e in
    the low nibble and 32 g + 4 j + 2 + e in the high one) and float16 [N / 16, K / 32, 2, 16] (d, then m, of the
    panel's 16 rows)."""
    n, k = u.shape
    if not fits(n, k, GROUP) or dm.shape != (n, k // GROUP, 2):
        raise ValueError(f"q4_panels.pack needs N % 16 == 0, groups of 32 and dm [N, K/32, 2]; got {n}x{k}")
    a = u.cpu().numpy().astype(np.uint8).reshape(n // PANEL, PANEL, k // GROUP, 8, 2, 2)  # [nb, i, g, j, half, e]
    byte = a[:, :, :, :, 0, :] | (a[:, :, :, :, 1, :] << 4)  # [nb, i, g, j, e]
    codes = torch.from_numpy(np.ascontiguousarray(byte.transpose(0, 2, 3, 1, 4))).reshape(n // PANEL, k // GROUP, 256)
    dmp = dm.reshape(n // PANEL, PANEL, k // GROUP, 2).permute(0, 2, 3, 1)
    return _aligned(codes), _aligned(dmp.to(torch.float16))


def linear(x: torch.Tensor, codes: torch.Tensor, dm: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """bf16 x [..., K] @ W^T (+ bias) -> bf16 [..., N], W = d * u + m unrounded, from `pack`. Needs available()."""
    return _EXT.get().q4_panels_linear(x, codes, dm, bias)
