"""Weight-only INT8 / INT4 linear for decode-sized batches (M = 1..SMALL_M_MAX_* rows), CPU, AVX-512 or AVX2.

W8A16 / W4A16: x stays bf16 or fp32 (converted to fp32 exactly), the weights are dequantized in registers
and every product is accumulated in fp32. At small M a linear layer is bound by reading its weights, and
torch's int8pack / int4pack CPU kernels stream them at well under half the machine's read bandwidth. The
C++ kernels beside this file (int_gemv.cpp) read each weight byte once per call and apply all M rows of x
to it while it is in registers.

- int8: qweight int8 [N, K] in its natural layout, per-channel fp32 scales [N].
- int4: group-wise, in a layout made for the kernel by `pack_int4` at load time (rows padded to a
  multiple of 64 columns; see int_gemv.cpp), fp32 scales [N, K/g], optional int8 zero points [N, K/g]
  in kiln's shifted convention (w = (q - z) * s, q and z in [-8, 7]); group sizes 16, 32 and
  multiples of 64 (`int4_group_ok`).

bench/kernel_int_linear.py measures them against torch's kernels and bf16_linear (figures in
docs/performance.md). int4 at M = 1 is bound by its decode (a vpermps per 16 weights), not by memory.

The extension is compiled on first use by torch.utils.cpp_extension.load (g++ and ninja on PATH; a minute
or so once), then cached in torch's extension directory and loaded in about a second by later processes.
`available()` is False when the CPU has neither AVX-512 F/BW/VL nor AVX2 (int_gemv_avx2.cpp, the same functions
in 8-lane form) or the build fails (one warning, never
raises); every function then falls back to portable torch code with the same results up to fp32
rounding, so callers may call them unconditionally. Results are deterministic and batch-invariant
(row i of the output does not depend on the other rows of x nor on the thread count). The GIL is
released while the kernels run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engines.torch.kernels import extension
from engines.torch.kernels.isa_variants import IsaVariants

# Largest number of rows of x for which the kernels are the fastest path on cold (streamed) weights
# (bench/kernel_int_linear.py, SmolLM2-135M-shaped stack): they beat torch's int8pack / int4pack
# kernels at every M measured (1..64), and "dequantize once + F.linear" from M ~ 32-40 on; callers use
# their large-M path above these.
SMALL_M_MAX_INT8 = 32
SMALL_M_MAX_INT4 = 32

INT4_CHUNK = 64  # int4 rows are padded to a multiple of this many columns (32 bytes)
BF16_DOT_FLAG = "avx512_bf16"  # the CPU flag of the affine int4 kernel's bf16 x bf16 dot products (vdpbf16ps)

_SOURCE = Path(__file__).with_name("int_gemv.cpp")
# Explicit ISA flags rather than -march=native (the cached binary stays valid on any AVX-512 CPU;
# available() checks the flags first). -ffp-contract=off: GCC may otherwise fuse the epilogue's
# multiply and add (scale, bias) into one FMA in some inlined tile shapes and not others.
_CFLAGS = ["-O3", "-ffp-contract=off", "-fopenmp"]  # + each ISA level's flags (isa_variants.py)
# AVX2 CPUs get int_gemv_avx2.cpp: the same functions, written for 8 lanes (isa_variants.py picks the level)
_EXT = IsaVariants(
    "kiln_int_gemv",
    _SOURCE,
    _CFLAGS,
    ldflags=["-fopenmp"],
    fallback="torch code",
    sources={"avx2": Path(__file__).with_name("int_gemv_avx2.cpp")},
)


def bf16_dot() -> bool:
    """The CPU (after KILN_CPU_ISA) has AVX512-BF16: int_gemv.cpp's bf16 tiles and dequantizer may run."""
    return BF16_DOT_FLAG in extension.cpu_flags()


def available() -> bool:
    """True when the compiled kernels can be used (compiles or loads them on the first call)."""
    return _EXT.available()


# ------------------------------------------------------------------------------------------------------
# int8
# ------------------------------------------------------------------------------------------------------


def int8_dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
) -> torch.Tensor:
    """q * s[:, None] as [N, K] in `dtype`, computed in fp32 (= engines.quant.rtn.dequantize, then cast).

    `out` (contiguous [N, K] of `dtype`), when given, is filled and returned instead of a new tensor.
    An order of magnitude faster than torch ops (docs/performance.md)."""
    ext = _EXT.get()
    if ext is not None and qweight.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
        return ext.int8_dequantize(qweight, scales.reshape(-1).float(), dtype, out)
    w = (qweight.float() * scales.reshape(-1, 1).float()).to(dtype)
    return w if out is None else out.copy_(w)


def int8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] (bf16 / fp32) @ (q * s[:, None])^T (+ bias) -> [..., N] in x's dtype, fp32 accumulation.

    qweight int8 [N, K], scales fp32 [N], bias [N] (any float dtype; added in fp32). Fast for at most
    SMALL_M_MAX_INT8 rows of x; correct for any."""
    ext = _EXT.get()
    if ext is None:
        w = int8_dequantize(qweight, scales, torch.float32)
        return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)
    return ext.int8_linear(x, qweight, scales, bias)


# ------------------------------------------------------------------------------------------------------
# int4
# ------------------------------------------------------------------------------------------------------


def int4_group_ok(group_size: int, k: int) -> bool:
    """Group sizes the int4 kernel handles: 16, 32 or a multiple of 64, dividing K."""
    return (group_size in (16, 32) or (group_size > 0 and group_size % 64 == 0)) and k % group_size == 0


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed int4 codes int8 [N, K] in [-8, 7] -> the kernel's layout, uint8 [N, Kp / 2] with
    Kp = K rounded up to a multiple of 64 (padding columns hold q = 0).

    Per row, chunk c of 64 columns is 32 bytes = 16 little-endian uint16 words; word j holds column
    64 c + 16 r + j in bits 4 r .. 4 r + 3 (r = 0..3), as the unsigned code u = q + 8."""
    if q.dim() != 2:
        raise ValueError("pack_int4 expects int codes [N, K]")
    n, k = q.shape
    kp = -(-k // INT4_CHUNK) * INT4_CHUNK
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("int4 codes must lie in [-8, 7]")
    # byte 2j of a chunk is word j's low byte (nibbles 0, 1), byte 2j + 1 its high byte (nibbles 2, 3): uint8 numpy
    # ops pack a model's codes in about a second, where int32 torch ops took several
    u = np.full((n, kp), 8, dtype=np.uint8)
    u[:, :k] = (q.cpu().numpy().astype(np.int16) + 8).astype(np.uint8)
    u = u.reshape(n, kp // INT4_CHUNK, 4, 16)  # [N, chunk, nibble r, word j]
    lo, hi = u[:, :, 0] | (u[:, :, 1] << 4), u[:, :, 2] | (u[:, :, 3] << 4)  # [N, chunk, 16]
    return torch.from_numpy(np.stack([lo, hi], axis=-1).reshape(n, kp // 2)).to(q.device)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [N, Kp / 2] -> signed codes int8 [N, K]."""
    n = packed.shape[0]
    b = packed.to(torch.int32).view(n, -1, 16, 2)
    words = b[..., 0] | (b[..., 1] << 8)  # [N, chunk, 16]
    u = torch.stack([(words >> (4 * r)) & 0xF for r in range(4)], dim=2)  # [N, chunk, 4, 16]
    return (u.reshape(n, -1)[:, :k] - 8).to(torch.int8)


def int4_dequantize(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    k: int,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(q - z) * s as [N, K] in `dtype`, computed in fp32 (= engines.quant.rtn.dequantize, then cast).
    `out`: as int8_dequantize."""
    ext = _EXT.get()
    if (
        ext is not None
        and packed.device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and int4_group_ok(group_size, k)
    ):
        return ext.int4_dequantize(packed, scales, zeros, group_size, k, dtype, out, bf16_dot())
    n = packed.shape[0]
    q = unpack_int4(packed, k).float().view(n, k // group_size, group_size)
    if zeros is not None:
        q = q - zeros.float().unsqueeze(-1)
    w = (q * scales.float().unsqueeze(-1)).view(n, k).to(dtype)
    return w if out is None else out.copy_(w)


def int4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] (bf16 / fp32) @ W^T (+ bias) -> [..., N] in x's dtype, fp32 accumulation, where W is
    int4_dequantize(..., x.dtype): with bf16 x each weight is rounded to bf16 first, so a decode step and a prefill
    (F.linear on the dequantized bf16 weight) multiply by the same weights.

    packed: pack_int4 of the signed codes; scales fp32 [N, K / g]; zeros int8 [N, K / g] in [-8, 7]
    or None (symmetric); bias [N] (any float dtype; added in fp32). Fast for at most SMALL_M_MAX_INT4
    rows of x; correct for any."""
    ext = _EXT.get()
    if ext is None or not int4_group_ok(group_size, x.shape[-1]):
        wdtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32  # the kernel's weights
        w = int4_dequantize(packed, scales, zeros, group_size, x.shape[-1], wdtype).float()
        return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)
    # bf16 x: the kernel rounds each weight to bf16, the value int4_dequantize(..., bfloat16) gives a large step
    return ext.int4_linear(x, packed, scales, zeros, group_size, bias, bf16_dot())


# ------------------------------------------------------------------------------------------------------
# affine int4 (GGUF Q4_1 blocks): w = d * u + m per group, u in [0, 15]
# ------------------------------------------------------------------------------------------------------


def int4_affine_dequantize(
    packed: torch.Tensor,
    dm: torch.Tensor,
    group_size: int,
    k: int,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """d * u + m as [N, K] in `dtype`: one fp32 multiply, then one add (ggml's Q4_1 dequantization, so float32
    gives the very values transformers reads from the GGUF file), then one rounding to `dtype`.

    packed: pack_int4 of the unsigned codes minus 8 (its nibbles hold u itself); dm: float16 [N, K / g, 2], the
    (d, m) of each group. `out`: as int8_dequantize."""
    ext = _EXT.get()
    if ext is not None and packed.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
        return ext.int4_affine_dequantize(packed, dm, group_size, k, dtype, out, bf16_dot())
    n = packed.shape[0]
    u = (unpack_int4(packed, k).float() + 8).view(n, k // group_size, group_size)
    d, m = dm.float().unbind(-1)
    w = (u * d.unsqueeze(-1) + m.unsqueeze(-1)).view(n, k).to(dtype)
    return w if out is None else out.copy_(w)


def int4_affine_linear(
    x: torch.Tensor, packed: torch.Tensor, dm: torch.Tensor, group_size: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] (bf16 / fp32) @ W^T (+ bias) -> [..., N] in x's dtype, fp32 accumulation, where W is
    int4_affine_dequantize(..., x.dtype): with bf16 x each weight is rounded to bf16 first, so a decode step and a
    prefill (F.linear on the dequantized bf16 weight) multiply by the same weights."""
    ext = _EXT.get()
    if ext is None or not int4_group_ok(group_size, x.shape[-1]):
        w = int4_affine_dequantize(packed, dm, group_size, x.shape[-1], x.dtype).float()
        return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)
    # AVX512-BF16 dot products for bf16 x where the CPU (after KILN_CPU_ISA) has them: int_gemv.cpp
    return ext.int4_affine_linear(x, packed, dm, group_size, bias, bf16_dot())
