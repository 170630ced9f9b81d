"""Weight-only linear layers for steps of many bf16 rows on AVX512-BF16 CPUs: GGUF Q4_1 codes (unrounded weights)
and int8 per-channel codes, multiplied in 16-row panels.

int_gemv.cpp's kernels keep a weight row's columns in one vector: right for a step of a few rows, which is bound by
reading the weights, but at 32 rows the decode they repeat for every row of x left them at under half the machine's
bf16 dot-product rate (docs/performance.md). panel_linear.cpp keeps 16 weight rows in a vector instead and decodes
once per pass of up to 12 rows of x, near that rate from a handful of rows to prompt-sized steps.

- Q4_1 (`q4_1_linear`): sum_g d_g (u_g . x_g) + m_g X_g with exact products and fp32 sums, from a second layout of
  the codes that `pack_q4_1` makes once at load (5 bits per weight, as the other). Fast from one row on: the affine
  int4 layer sends every bf16 row here.
- int8 (`int8_linear`): reads the codes' own [N, K] layout, widening each panel to bf16 once per call, so it needs no
  second copy; below a few rows int_gemv's kernel, which streams the codes once, is faster (`INT8_MIN_ROWS`).

Shapes: N a multiple of 16; groups of 32 (Q4_1) or K a multiple of 32 (int8) (`fits_*`). `available()` is False
without AVX512-BF16 (after KILN_CPU_ISA) or when the build fails; callers then keep int_gemv's kernels. Results are
deterministic and batch-invariant.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engines.torch.kernels import extension
from engines.torch.kernels.extension import LazyExtension

PANEL = 16  # weight rows per panel
GROUP = 32  # Q4_1's group

_EXT = LazyExtension(
    "kiln_panel_linear",
    Path(__file__).with_name("panel_linear.cpp"),
    ["-O3", "-ffp-contract=off", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"],
    required_cpu_flags=("avx512f", "avx512bw", "avx512vl", "avx512_bf16"),
    ldflags=["-fopenmp"],
    fallback="int_gemv's kernels",
)


def available() -> bool:
    """True when the kernels can run here (compiles or loads them on the first call). The flags are read on every
    call, as int_linear.bf16_dot does, so a test that withholds AVX512-BF16 turns them off."""
    return set(_EXT.required_cpu_flags) <= extension.cpu_flags() and _EXT.available()


def fits_q4_1(n: int, k: int, group_size: int) -> bool:
    return group_size == GROUP and n % PANEL == 0 and k % GROUP == 0 and n * k > 0


def fits_int8(n: int, k: int) -> bool:
    return n % PANEL == 0 and k % 32 == 0 and n * k > 0


def _aligned(t: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """A contiguous copy of t whose data starts on an `alignment`-byte boundary (the kernel's aligned loads)."""
    nbytes = t.numel() * t.element_size()
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8)
    offset = (-raw.data_ptr()) % alignment
    out = raw[offset : offset + nbytes].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def pack_q4_1(u: torch.Tensor, dm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes u (uint8 [N, K], values 0..15) and float16 (d, m) [N, K / 32, 2] -> the kernel's (codes, dm):
    uint8 [N / 16, K / 32, 256] (byte 32 j + 2 i + e of panel nb, group g: row 16 nb + i, columns 32 g + 4 j + e in
    the low nibble and 32 g + 4 j + 2 + e in the high one) and float16 [N / 16, K / 32, 2, 16] (d, then m, of the
    panel's 16 rows)."""
    n, k = u.shape
    if not fits_q4_1(n, k, GROUP) or dm.shape != (n, k // GROUP, 2):
        raise ValueError(f"panel_linear.pack_q4_1 needs N % 16 == 0, groups of 32 and dm [N, K/32, 2]; got {n}x{k}")
    a = u.cpu().numpy().astype(np.uint8).reshape(n // PANEL, PANEL, k // GROUP, 8, 2, 2)  # [nb, i, g, j, half, e]
    byte = a[:, :, :, :, 0, :] | (a[:, :, :, :, 1, :] << 4)  # [nb, i, g, j, e]
    codes = torch.from_numpy(np.ascontiguousarray(byte.transpose(0, 2, 3, 1, 4))).reshape(n // PANEL, k // GROUP, 256)
    dmp = dm.reshape(n // PANEL, PANEL, k // GROUP, 2).permute(0, 2, 3, 1)
    return _aligned(codes), _aligned(dmp.to(torch.float16))


def q4_1_linear(
    x: torch.Tensor, codes: torch.Tensor, dm: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """bf16 x [..., K] @ W^T (+ bias) -> bf16 [..., N], W = d * u + m unrounded, from `pack_q4_1`. Needs available()."""
    return _EXT.get().q4_1_linear(x, codes, dm, bias)


# Rows of x from which int8_linear beats int_gemv's int8 kernel (bench/kernel_int_linear.py; docs/performance.md):
# below, a step is bound by reading the codes, which that kernel streams once where this one also widens them.
INT8_MIN_ROWS = 12


def int8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """bf16 x [..., K] @ (q * s[:, None])^T (+ bias) -> bf16 [..., N]: each dot product q . x rounded to bf16, then
    scaled (as int_linear.int8_linear and the layer's bf16 GEMM on the codes). qweight int8 [N, K] as stored, scales
    float32 [N]. Needs available() and fits_int8."""
    return _EXT.get().int8_linear(x, qweight, scales, bias)
