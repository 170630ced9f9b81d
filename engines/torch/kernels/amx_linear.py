"""bf16 linear on Intel AMX for steps of up to MAX_ROWS rows: bf16 in, bf16 out, fp32 accumulation.

From a few rows to a few dozen a linear layer is bound by reading its weight once, but the AVX-512
kernel (bf16_linear) runs out of arithmetic past ~8 rows and oneDNN's packed matmul streams the weight
at about half the machine's read rate. AMX tiles do the arithmetic in a few instructions per 2 KiB of
weight, so the kernel (amx_linear.cpp) runs at the memory's pace. It beats oneDNN's packed matmul up to
a few hundred rows and loses to it at long prefills (bench/kernel_bf16_linear.py; figures in
docs/performance.md) -- hence MAX_ROWS.

`amx_int8_linear` does the same for weight-only int8 (W8A16): codes packed the same way, widened to
bf16 in cache per k step, per-column scales applied to the fp32 sums. `amx_int4_linear` does it for
group-wise int4 (W4A16, groups of a multiple of 32): (q - z) widened exactly, each group's sums scaled.
At 32 rows these are several times faster than kiln's AVX-512 kernels; below ~8 rows the AVX-512 kernels
are faster (quantized.AMX_INT8_MIN_ROWS; bench/kernel_int_linear.py).

The weight is packed once (`pack`, plain torch) into tile order; N and K must be multiples of 32
(`fits`). `available()` is False on CPUs without AMX (AMD, Intel before Sapphire Rapids), when Linux
refuses AMX state, or when the build fails; callers then keep oneDNN. Results are deterministic and
batch-invariant; they differ from F.linear's in rounding only (another summation order).
"""

from __future__ import annotations

from pathlib import Path

import torch

from engines.torch.kernels.extension import LazyExtension

MAX_ROWS = 512  # rows up to which the kernel beats oneDNN's packed matmul (bench/kernel_bf16_linear.py)

_SOURCE = Path(__file__).with_name("amx_linear.cpp")
_CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-fopenmp"]
_EXT = LazyExtension(
    "kiln_amx_linear",
    _SOURCE,
    _CFLAGS,
    required_cpu_flags=("avx512_bf16", "amx_tile", "amx_bf16"),
    ldflags=["-fopenmp"],
    fallback="oneDNN",
    ready=lambda ext: bool(ext.amx_init()),  # Linux grants AMX tile state to a process that asks
)


def available() -> bool:
    """True when the kernel can run here: compiled (or loaded) and AMX state granted by the kernel."""
    return _EXT.available()


def fits(weight: torch.Tensor) -> bool:
    """Shapes the kernel takes: a 2-D bf16 weight or int8 codes [N, K] with N and K multiples of 32."""
    return (
        weight.dim() == 2
        and weight.dtype in (torch.bfloat16, torch.int8)
        and weight.shape[0] % 32 == 0
        and weight.shape[1] % 32 == 0
        and weight.numel() > 0
    )


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] bf16 weight or int8 codes -> the kernel's order: for each 32-column block nb and 32-input
    block kb, two B tiles (columns 0-15, 16-31) of 16 input pairs x 16 columns x 2 -- element
    [nb, kb, h, p, n, e] is W[32 nb + 16 h + n, 32 kb + 2 p + e]."""
    if not fits(weight):
        raise ValueError("amx_linear.pack needs a bf16 or int8 [N, K] weight with N and K multiples of 32")
    n, k = weight.shape
    w = weight.detach().reshape(n // 32, 2, 16, k // 32, 16, 2)  # [nb, h, n, kb, p, e]
    return w.permute(0, 3, 1, 4, 2, 5).contiguous()  # [nb, kb, h, p, n, e]


def amx_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] bf16 @ W^T (+ bias) -> [..., N] bf16, from `pack(W)`. Needs available()."""
    n = packed.shape[0] * 32
    return _EXT.get().amx_linear(x, packed, n, bias)


def int4_fits(n: int, k: int, group_size: int) -> bool:
    """Group-wise int4 shapes the kernel takes: N and K multiples of 32, groups a multiple of 32 dividing K."""
    return n % 32 == 0 and k % 32 == 0 and n * k > 0 and group_size % 32 == 0 and k % group_size == 0


def pack_int4(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Signed int4 codes int8 [N, K] in [-8, 7], fp32 scales [N, K/g], int8 zero points [N, K/g] or None
    (kiln's convention: w = (q - z) * s) -> (packed, scales_t, zoff) for amx_int4_linear:
    - packed uint8: the codes in `pack`'s order, each tile row of 32 values as 16 bytes holding value j
      in the low nibble and value j + 16 in the high one, as u = q + 8;
    - scales_t fp32 [N/32, G, 32]: each column block's scales per group, columns contiguous;
    - zoff int8 [N/32, G, 64]: z + 8 per group in the kernel's lane order (value j of a tile row of B
      tile h is column 16 h + j // 2), None when symmetric."""
    n, k = codes.shape
    if not int4_fits(n, k, group_size):
        raise ValueError("amx_linear.pack_int4 needs N, K multiples of 32 and a group size multiple of 32 dividing K")
    groups = k // group_size
    rows = pack(codes.to(torch.int8)).view(n // 32, k // 32, 32, 32).to(torch.int16) + 8  # [nb, kb, row, lane]
    packed = (rows[..., :16] | (rows[..., 16:] << 4)).to(torch.uint8).contiguous()  # [nb, kb, row, 16]
    scales_t = scales.float().reshape(n // 32, 32, groups).permute(0, 2, 1).contiguous()
    zoff = None
    if zeros is not None:
        z = (zeros.to(torch.int16) + 8).reshape(n // 32, 2, 16, groups).permute(0, 3, 1, 2)  # [nb, G, h, 16]
        zoff = z.repeat_interleave(2, dim=-1).reshape(n // 32, groups, 64).to(torch.int8).contiguous()
    return packed, scales_t, zoff


def amx_int4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_t: torch.Tensor,
    zoff: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] bf16 @ ((Q - Z) * S)^T (+ bias) -> [..., N] bf16, from `pack_int4`. Codes become exact
    bf16 (q - z) in cache per k step; each group's fp32 sums are scaled per column and added up in fp32.
    Needs available()."""
    return _EXT.get().amx_int4_linear(x, packed, scales_t, zoff, group_size, bias)


def amx_int8_linear(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] bf16 @ (Q * scales[:, None])^T (+ bias) -> [..., N] bf16, from `pack(Q)` of int8 codes
    Q [N, K] and fp32 per-column scales [N]. The codes are widened to bf16 exactly, per column block in
    cache; the scale multiplies the fp32 sum. Needs available()."""
    return _EXT.get().amx_int8_linear(x, packed, scales, bias)
