"""Quantized runtime linear layers (weights stay quantized in memory; docs/performance.md says why it pays).

Decode on a CPU is weight-bandwidth bound, so fewer weight bytes per step means more tokens/s:
int8 halves and int4 quarters the bytes of bf16. Each layer picks torch's fused CPU kernel where it
applies and falls back to a portable dequantize + F.linear (or reference) path otherwise; the fallbacks
are module-level functions so tests can call them directly.

Layers (all take x [..., K] in bf16/fp32 and return [..., N] in x's dtype):
- Int8WeightOnlyLinear  (W8A16)  kiln's AVX-512 kernel at decode sizes (engines/torch/kernels/int_linear),
                                 torch._weight_int8pack_mm above them
- Int4WeightOnlyLinear  (W4A16)  kiln's AVX-512 kernel at decode sizes, dequantize + F.linear above them;
                                 aten._weight_int4pack_mm_for_cpu (group-wise) where kiln's kernel is unavailable
- W8A8Int8Linear        (SmoothQuant runtime) per-token dynamic int8 x per-channel int8, torch._int_mm
(Intel AMX CPUs: the int8 and int4 layers run bf16 steps of 8..512 rows on kernels/amx_linear)
- Fp8Linear             float8_e4m3fn weights; CPU upcasts, CUDA SM>=89 uses torch._scaled_mm
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from engines.quant.fp8 import FP8_DTYPE, FP8_MAX
from engines.quant.rtn import dequantize, qrange
from engines.quant.smoothquant import dynamic_quantize_per_token
from engines.quant.types import QuantizedWeight
from engines.torch import step_rows
from engines.torch.kernels import amx_linear, int_linear, panel_linear

# Rows from which the AMX int8 and int4 kernels beat kiln's AVX-512 ones (bench/kernel_int_linear.py)
AMX_INT8_MIN_ROWS = 8
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT_KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # x dtypes of kiln's int8/int4 kernels


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.aten, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _amx_codes(qweight: torch.Tensor) -> torch.Tensor | None:
    """int8 codes [N, K] once more in AMX tile order, chosen at construction: None where the AMX kernel does
    not run here (no AMX, another device) or does not take the shape."""
    if qweight.device.type == "cpu" and amx_linear.fits(qweight) and amx_linear.available():
        return amx_linear.pack(qweight)
    return None


def _amx_step(x: torch.Tensor, in_features: int) -> bool:
    """Whether a layer holding AMX-packed codes runs x on them: bf16 steps of AMX_INT8_MIN_ROWS..MAX_ROWS rows
    (numel bounds: numel = rows * in_features, without a reshape)."""
    return (
        x.dtype == torch.bfloat16 and AMX_INT8_MIN_ROWS * in_features <= x.numel() <= amx_linear.MAX_ROWS * in_features
    )


def _flatten(x: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    # x: [..., K] -> x2 [M, K] contiguous, plus the leading shape to restore
    return x.reshape(-1, x.shape[-1]).contiguous(), x.shape[:-1]


# ----------------------------------------------------------------------------------------------------
# W8A16: int8 per-channel symmetric weights
# ----------------------------------------------------------------------------------------------------


def int8_weight_only_fallback(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x (q * s)^T with the weight dequantized into x's dtype. x [..., K], q int8 [N, K], s [N]."""
    w = qweight.to(x.dtype) * scales.reshape(-1, 1).to(x.dtype)  # w: [N, K]
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


class Int8WeightOnlyLinear(nn.Module):
    """W8A16: int8 weights (per output channel, symmetric), activations stay bf16/fp32.

    Why: halves the weight bytes streamed per decode step vs bf16. On CPU with kiln's AVX-512 kernel
    (int_linear; `small_m_max` = int_linear.SMALL_M_MAX_INT8, 0 when it is unavailable), bf16/fp32 x
    with at most small_m_max rows runs int_linear.int8_linear (fp32 accumulation, x exact, bias added
    in fp32; 1.7-2x torch's speed at M = 1..16), and larger steps (prefill) dequantize the weight once
    and run F.linear (~2.4x torch._weight_int8pack_mm at M = 64; bench/kernel_int_linear.py). Without
    kiln's kernel, torch._weight_int8pack_mm(x [M, K], w int8 [N, K], scales [N]) runs; it needs scales
    in exactly x's dtype (checked on torch 2.13), so a float32, bf16 and fp16 copy of the N scales are
    kept (negligible bytes). Other devices fall back to int8_weight_only_fallback. On a CPU with Intel
    AMX, bf16 steps of AMX_INT8_MIN_ROWS..amx_linear.MAX_ROWS rows run amx_linear.amx_int8_linear on a
    second copy of the codes in tile order (same values up to fp32 summation order; ~3x the AVX-512
    kernel at 32 rows, bench/kernel_int_linear.py). On a CPU with AVX512-BF16 and no AMX, bf16 decode steps
    of panel_linear.INT8_MIN_ROWS rows or more, and prompt rows, run panel_linear.int8_linear on the same codes
    (1.6x the AVX-512 kernel at 32 rows, docs/performance.md).
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise ValueError("qweight must be int8 [N, K]")
        n = qweight.shape[0]
        self.in_features, self.out_features = qweight.shape[1], n
        self.register_buffer("qweight", qweight.contiguous())  # [N, K] int8
        s = scales.reshape(n).float().contiguous()
        self.register_buffer("scales", s)  # [N] float32
        self._scales_by_dtype = {
            torch.float32: s,
            torch.bfloat16: s.to(torch.bfloat16),
            torch.float16: s.to(torch.float16),
        }
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._int8pack_mm = _has_op("_weight_int8pack_mm")
        self.small_m_max = (
            int_linear.SMALL_M_MAX_INT8 if self.qweight.device.type == "cpu" and int_linear.available() else 0
        )
        self.use_kernel = self._int8pack_mm or self.small_m_max > 0  # False: always the fallback
        # Intel AMX: the codes once more, in tile order, for bf16 steps of AMX_INT8_MIN_ROWS..MAX_ROWS rows
        self.amx_packed = _amx_codes(self.qweight)
        # AVX512-BF16 without AMX: bf16 steps past a few rows through panel_linear, on these very codes
        self.panels = (
            self.amx_packed is None
            and self.small_m_max > 0
            and panel_linear.fits_int8(n, self.in_features)
            and panel_linear.available()
        )

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> Int8WeightOnlyLinear:
        if qw.bits != 8 or not qw.symmetric or qw.group_size is not None or qw.g_idx is not None:
            raise ValueError(
                "Int8WeightOnlyLinear needs a per-channel symmetric 8-bit QuantizedWeight (quantize_rtn(w, 8))"
            )
        return cls(qw.qweight, qw.scales, bias)

    @property
    def weight_bytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * 4

    def dequantized_weight(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        """[N, K] weight q * s computed in fp32 (= engines.quant.rtn.dequantize), cast to `dtype`: for
        large-M steps, dequantize once and F.linear. Vectorised kernel on CPU (~memory speed). `out`:
        optional destination (contiguous [N, K] of `dtype`, e.g. a scratch buffer reused across layers)."""
        return int_linear.int8_dequantize(self.qweight, self.scales, dtype, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.amx_packed is not None and _amx_step(x, self.in_features):
            return amx_linear.amx_int8_linear(x, self.amx_packed, self.scales, self.bias)
        if self.panels and x.is_cpu and x.dtype == torch.bfloat16 and x.numel():
            # decode steps of a few rows through int_gemv's kernel (bound by reading the codes, which it streams
            # once), every other row through the panels (prompt rows included: batch-invariant, the same epilogue)
            return step_rows.route(x, self.in_features, panel_linear.INT8_MIN_ROWS - 1, self._kernel, self._panels)
        # decode rows (at most small_m_max) through the kernel, prompt rows through the GEMM below: which rows are
        # which is the step's (engines/torch/step_rows.py), so a prompt computes the same after a prefix-cache hit
        if self.small_m_max and x.is_cpu and x.dtype in _INT_KERNEL_DTYPES and x.numel():
            return step_rows.route(x, self.in_features, self.small_m_max, self._kernel, self._gemm)
        return self._gemm(x)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return int_linear.int8_linear(x, self.qweight, self.scales, self.bias)  # [..., N], leading dims kept

    def _panels(self, x: torch.Tensor) -> torch.Tensor:
        return panel_linear.int8_linear(x, self.qweight, self.scales, self.bias)  # [..., N], leading dims kept

    def _gemm(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = _flatten(x)  # x2: [M, K]
        if self.small_m_max and x2.is_cpu and x2.dtype == torch.bfloat16:
            # bf16: one bf16 GEMM on the int8 codes (exact in bf16), then the scale in fp32. The kernel rounds its
            # dot products the same way before scaling, so decode and prompt rows multiply by the same weights
            # (q * s itself rounded to bf16 would not: a prefix-cached prompt answered differently).
            y = F.linear(x2, self.qweight.to(torch.bfloat16)).float().mul_(self.scales)  # [M, N]
            if self.bias is not None:
                y += self.bias.float()
            y = y.to(torch.bfloat16)
        elif self.small_m_max and x2.is_cpu and x2.dtype in _INT_KERNEL_DTYPES:
            # fp32: dequantize once, one GEMM (~2.4x torch._weight_int8pack_mm at M = 64)
            w = self.dequantized_weight(x2.dtype)
            y = F.linear(x2, w, None if self.bias is None else self.bias.to(w.dtype))  # [M, N]
        elif self.use_kernel and self._int8pack_mm and x2.device.type == "cpu" and x2.dtype in _KERNEL_DTYPES:
            y = torch._weight_int8pack_mm(x2, self.qweight, self._scales_by_dtype[x2.dtype])  # [M, N]
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        else:
            y = int8_weight_only_fallback(x2, self.qweight, self.scales, self.bias)  # [M, N]
        return y.reshape(*lead, self.out_features)


# ----------------------------------------------------------------------------------------------------
# W4A16: group-wise int4 weights
# ----------------------------------------------------------------------------------------------------


def int4_to_torch_cpu_format(
    qw: QuantizedWeight, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """QuantizedWeight (4-bit, group-wise, contiguous groups) -> (unsigned codes int32 [N, K] in [0, 15],
    scales_and_zeros [K // g, N, 2] in `dtype`) for torch's CPU int4pack kernel.

    Torch's convention (verified numerically): w = (u - 8) * scale + zero with u unsigned.
    Ours: w = (q - z) * s with q, z signed/shifted ([-8, 7]; z = 0 when symmetric). With u = q + 8:
    w = (u - 8) * s + (-z * s), so scale = s and zero = -z * s. The codes map exactly; only the
    float scale/zero rounding to `dtype` changes anything.
    """
    if qw.bits != 4 or qw.group_size is None:
        raise ValueError("needs a group-wise 4-bit QuantizedWeight")
    lo, hi = qrange(4)
    u = (qw.qweight.to(torch.int32) - lo).contiguous()  # [N, K] in [0, 15]
    s = qw.scales.float()  # [N, G]
    zero = torch.zeros_like(s) if qw.zeros is None else -qw.zeros.float() * s  # [N, G]
    sz = torch.stack([s.t(), zero.t()], dim=-1).to(dtype).contiguous()  # [G, N, 2]
    return u, sz


def int4_weight_only_fallback(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize-on-the-fly reference path: y = x dequantize(qw)^T in x's dtype. x [..., K]."""
    w = dequantize(qw).to(x.dtype)  # [N, K]
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


class Int4WeightOnlyLinear(nn.Module):
    """W4A16: group-wise int4 weights (symmetric or asymmetric), activations stay bf16/fp32.

    Why: a quarter of bf16's weight bytes; decode is bandwidth bound so this is the fastest single-stream
    path. Two CPU backends, chosen at load:
    - kiln's AVX-512 kernel (engines/torch/kernels/int_linear), when it is available and the group size
      is 16, 32 or a multiple of 64: the codes are repacked once into the kernel's layout
      (int_linear.pack_int4; rows padded to a multiple of 64 columns) and kept with fp32 scales and int8
      zero points -- the only copy of the weight. bf16/fp32 x with at most `small_m_max` rows
      (int_linear.SMALL_M_MAX_INT4) runs the kernel (fp32 accumulation on the dequantized weights, rounded to
      bf16 for bf16 x as the large-M path's bf16 weight is; faster than torch's int4 kernel at every decode size);
      larger steps (prefill) dequantize the
      weight once per call (dequantized_weight, ~memory speed) and run F.linear, faster than torch's int4
      matmul there too (bench/quantized_linear.py).
    - otherwise torch's kernel: the portable codes are repacked with aten._convert_weight_to_int4pack_for_cpu
      (wants int32 [N, K] unsigned 0..15, returns uint8 [N, K/2] in its own nibble order) and
      scales_and_zeros [K/g, N, 2] is built per activation dtype (the kernel requires it to match x's dtype).
    - on a CPU with Intel AMX, bf16 steps of AMX_INT8_MIN_ROWS..amx_linear.MAX_ROWS rows run
      amx_linear.amx_int4_linear on one more copy of the codes in tile order (groups of a multiple of
      32): ~3x the AVX-512 kernel at 32 rows (bench/kernel_int_linear.py).
    Columns quantized out of order (GPTQ act_order g_idx) are handled by permuting K at load so groups are
    contiguous and gathering x's columns the same way per call. Without either kernel, or when built from
    a non-CPU QuantizedWeight, it dequantizes on the fly (int4_weight_only_fallback). The packed forms and
    scales are plain attributes (not buffers), so a kernel-path layer stays on CPU; .to(cuda) on it is not
    supported.
    """

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        if qw.bits != 4 or qw.group_size is None:
            raise ValueError("Int4WeightOnlyLinear needs a group-wise 4-bit QuantizedWeight")
        n, k = qw.shape
        g = qw.group_size
        if k % g:
            raise ValueError(f"group_size {g} must divide K={k}")
        self.in_features, self.out_features, self.group_size = k, n, g
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.perm = None
        if qw.g_idx is not None:
            gi = qw.g_idx.long()
            if not torch.equal(gi, torch.arange(k) // g):
                perm = torch.argsort(gi, stable=True)
                if not torch.equal(gi[perm], torch.arange(k) // g):
                    raise ValueError("g_idx must give every group exactly group_size columns")
                self.perm = perm
                qw = QuantizedWeight(qw.qweight[:, perm].contiguous(), qw.scales, qw.zeros, 4, g, qw.symmetric)
            else:
                qw = QuantizedWeight(qw.qweight, qw.scales, qw.zeros, 4, g, qw.symmetric)
        self.qw = qw  # contiguous-group view, kept for the fallback path (int8 codes)
        on_cpu = qw.qweight.device.type == "cpu"
        # Intel AMX: the codes once more, in tile order, for bf16 steps of AMX_INT8_MIN_ROWS..MAX_ROWS rows
        self.amx = (
            amx_linear.pack_int4(qw.qweight, qw.scales, qw.zeros, g)
            if on_cpu and amx_linear.int4_fits(n, k, g) and amx_linear.available()
            else None
        )
        self.small_m_max = 0
        self.use_kernel = False
        self._sz: dict[torch.dtype, torch.Tensor] = {}
        if on_cpu and int_linear.int4_group_ok(g, k) and int_linear.available():
            self.small_m_max = int_linear.SMALL_M_MAX_INT4
            self.use_kernel = True
            self.kpacked = int_linear.pack_int4(qw.qweight)  # uint8 [N, Kp/2], kiln's layout
            self.kscales = qw.scales.float().contiguous()  # [N, G]
            self.kzeros = None if qw.zeros is None else qw.zeros.to(torch.int8).contiguous()  # [N, G]
            self.qw = None  # the packed form holds everything; drop the unpacked int8 codes
        elif (
            on_cpu
            and g in (32, 64, 128, 256)
            and n % 16 == 0  # what torch's int4 kernel accepts
            and _has_op("_convert_weight_to_int4pack_for_cpu")
            and _has_op("_weight_int4pack_mm_for_cpu")
        ):
            self.use_kernel = True
            u, sz = int4_to_torch_cpu_format(qw, torch.float32)
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)  # uint8 [N, K/2]
            self._sz = {torch.float32: sz, torch.bfloat16: sz.to(torch.bfloat16), torch.float16: sz.to(torch.float16)}
            # the kernel holds everything it needs; drop the unpacked int8 codes to save memory
            self.qw = None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> Int4WeightOnlyLinear:
        return cls(qw, bias)

    @property
    def weight_bytes(self) -> int:
        if self.small_m_max:  # kiln's layout (rows padded to 64 columns) + fp32 scales + int8 zeros
            z = 0 if self.kzeros is None else self.kzeros.numel()
            return self.kpacked.numel() + self.kscales.numel() * 4 + z
        if self.use_kernel:
            return self.packed.numel() + self._sz[torch.bfloat16].numel() * 2  # bf16 scales+zeros
        n, k = self.out_features, self.in_features
        extra = self.qw.scales.numel() * 4 + (0 if self.qw.zeros is None else self.qw.zeros.numel())
        return n * k // 2 + extra  # as stored packed on disk

    def dequantized_weight(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        """[N, K] weight (q - z) * s computed in fp32 (= engines.quant.rtn.dequantize), cast to `dtype`,
        in the layer's column order (permuted by g_idx when there is one, like the input the layer
        feeds its matmul). For large-M steps: dequantize once, then F.linear (x gathered by `perm`).
        Exact with kiln's kernel (the usual case; a vectorised kernel, ~memory speed) or without any
        kernel; with torch's int4 form only (no AVX-512), within an fp32 rounding of it. `out`: as
        Int8WeightOnlyLinear.dequantized_weight."""
        k = self.in_features
        if self.small_m_max:
            return int_linear.int4_dequantize(self.kpacked, self.kscales, self.kzeros, self.group_size, k, dtype, out)
        if self.use_kernel:
            # torch's packed form: its own op on an identity input (M = K) returns w^T computed as
            # (u - 8) * scale + zero with zero = -z * s rounded to fp32 (one more rounding than ours)
            eye = torch.eye(k, dtype=torch.float32)
            w_t = torch.ops.aten._weight_int4pack_mm_for_cpu(
                eye, self.packed, self.group_size, self._sz[torch.float32]
            )  # [K, N]
            w = w_t.t().to(dtype)
        else:
            w = dequantize(self.qw).to(dtype)
        return w.contiguous() if out is None else out.copy_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.amx is not None and _amx_step(x, self.in_features):
            xg = x if self.perm is None else x.index_select(-1, self.perm)  # grouped column order
            return amx_linear.amx_int4_linear(xg, *self.amx, self.group_size, self.bias)
        if (
            self.small_m_max
            and x.is_cpu
            and 0 < x.numel() <= self.small_m_max * self.in_features
            and x.dtype in _INT_KERNEL_DTYPES
            and self.perm is None
        ):  # decode-sized: cheapest checks
            return int_linear.int4_linear(
                x, self.kpacked, self.kscales, self.kzeros, self.group_size, self.bias
            )  # [..., N], leading dims kept
        x2, lead = _flatten(x)  # x2: [M, K]
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm.to(x2.device))  # [M, K] in grouped column order
        if self.use_kernel and x2.device.type != "cpu":
            raise RuntimeError(
                "Int4WeightOnlyLinear was packed for a CPU kernel; "
                "build it from the QuantizedWeight on the target device instead"
            )
        if self.small_m_max:
            if x2.shape[0] <= self.small_m_max and x2.dtype in _INT_KERNEL_DTYPES:
                y = int_linear.int4_linear(
                    x2, self.kpacked, self.kscales, self.kzeros, self.group_size, self.bias
                )  # [M, N]
            else:  # prefill-sized: dequantize once, one GEMM (faster than per-row kernels here)
                w = self.dequantized_weight(x2.dtype if x2.dtype in _INT_KERNEL_DTYPES else torch.float32)
                y = F.linear(x2.to(w.dtype), w, None if self.bias is None else self.bias.to(w.dtype)).to(x2.dtype)
        elif self.use_kernel:
            xk = x2 if x2.dtype in self._sz else x2.float()  # other dtypes run the kernel in fp32
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xk, self.packed, self.group_size, self._sz[xk.dtype]).to(
                x2.dtype
            )  # [M, N]
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        else:
            y = int4_weight_only_fallback(x2, self.qw, self.bias)  # [M, N]
        return y.reshape(*lead, self.out_features)


# ----------------------------------------------------------------------------------------------------
# W8A8: SmoothQuant runtime
# ----------------------------------------------------------------------------------------------------

W8A16_MAX_ROWS = 16  # int_linear.int8_linear beats padded _int_mm up to here (bench/quantized_linear.py)
# ...and past this many rows (prefill) dequantizing the weight once for a bf16 GEMM does: CPU _int_mm slows
# down several-fold past ~200 rows (docs/performance.md, "Why each CPU kernel exists")
INT_MM_MAX_ROWS = 128
_INT_MM_MIN_M = 17  # torch._int_mm on CPU/CUDA requires M > 16 (and K, N multiples of 8)


def w8a8_fallback(x2: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor) -> torch.Tensor:
    """Exact int32 accumulation without _int_mm (as the CPU path of w8a8_linear_reference, tests/quant_reference.py).
    x2 [M, K]."""
    xq, xs = dynamic_quantize_per_token(x2)  # int8 [M, K], fp32 [M, 1]
    acc = xq.to(torch.int32) @ qweight.t().to(torch.int32)  # [M, N] int32
    return (acc.float() * xs * w_scales.float().reshape(1, -1)).to(x2.dtype)


class W8A8Int8Linear(nn.Module):
    """SmoothQuant W8A8: per-token dynamic int8 activations x per-channel int8 weights, int32 accumulate.

    Decode-sized steps (at most W8A16_MAX_ROWS rows, CPU with kiln's int kernel) skip the activation
    quantization and run the same int8 weights through kiln's W8A16 kernel: at 1..16 rows it streams
    the weights ~2x faster than _int_mm's padded GEMM, and keeps activations exact. Measured in the
    engine (bench/build_matrix.py): this is what makes an int8-sq engine fast both single-stream and
    at concurrency 32, where _int_mm's int8 GEMM beats the bf16 one.

    Prefill-sized steps (more than INT_MM_MAX_ROWS rows, same CPU condition) dequantize the int8 weights
    once and run a bf16 GEMM, with exact activations again: torch's CPU _int_mm slows down 5-6x past ~200
    rows (an int8-sq engine's TTFT at concurrency 32 was three times bf16's). So on such a CPU the
    int8 activation path serves batches of 17..128 rows only.

    On a CPU with Intel AMX, bf16 steps of AMX_INT8_MIN_ROWS..amx_linear.MAX_ROWS rows run W8A16 on AMX
    tiles instead (amx_linear.amx_int8_linear: exact activations, 2-3x _int_mm's speed at 32 rows), so
    there the int8 activation path below is left for fp32 activations and steps above MAX_ROWS.

    Why: both operands int8 → VNNI int8 GEMM via torch._int_mm, best at larger batches (compute bound)
    while streaming int8 weights at decode. _int_mm needs M > 16 and K, N % 8 == 0, so decode-sized
    inputs (M <= 16) are zero-padded to 17 rows (zero rows add nothing and are sliced off) rather than
    taking the much slower int32 matmul fallback (w8a8_fallback), which is used only when K or N
    don't fit or the op is missing. The result is rescaled by x_scale[M,1] * w_scale[1,N] and cast back
    to x's dtype. The smoothing factors are assumed already folded into the weights / preceding norm.
    """

    def __init__(self, qweight: torch.Tensor, w_scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise ValueError("qweight must be int8 [N, K]")
        n, k = qweight.shape
        self.in_features, self.out_features = k, n
        self.register_buffer("qweight", qweight.contiguous())  # [N, K] int8
        self.register_buffer("w_scales", w_scales.reshape(1, n).float().contiguous())  # [1, N]
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.use_kernel = _has_op("_int_mm") and k % 8 == 0 and n % 8 == 0
        # decode-sized steps take kiln's W8A16 kernel on the same int8 weights (see the class doc)
        self.small_m_max = W8A16_MAX_ROWS if self.qweight.device.type == "cpu" and int_linear.available() else 0
        self._w_scales_flat = self.w_scales.reshape(n).contiguous()
        # Intel AMX: W8A16 on the same codes for bf16 steps of AMX_INT8_MIN_ROWS..MAX_ROWS rows (class doc)
        self.amx_packed = _amx_codes(self.qweight)

    @classmethod
    def from_quantized(
        cls,
        qweight: torch.Tensor | QuantizedWeight,
        w_scales: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> W8A8Int8Linear:
        """From quantize_w8a8's (int8 [N, K], scales [N]) or a per-channel symmetric 8-bit QuantizedWeight."""
        if isinstance(qweight, QuantizedWeight):
            qw = qweight
            if qw.bits != 8 or not qw.symmetric or qw.group_size is not None or qw.g_idx is not None:
                raise ValueError("W8A8Int8Linear needs a per-channel symmetric 8-bit QuantizedWeight")
            return cls(qw.qweight, qw.scales, bias)
        if w_scales is None:
            raise ValueError("w_scales is required with a raw int8 weight")
        return cls(qweight, w_scales, bias)

    @property
    def weight_bytes(self) -> int:
        return self.qweight.numel() + self.w_scales.numel() * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.amx_packed is not None and _amx_step(x, self.in_features):
            return amx_linear.amx_int8_linear(x, self.amx_packed, self._w_scales_flat, self.bias)
        if x.is_cpu and 0 < x.numel() <= self.small_m_max * self.in_features and x.dtype in _INT_KERNEL_DTYPES:
            return int_linear.int8_linear(x, self.qweight, self._w_scales_flat, self.bias)  # [..., N]
        x2, lead = _flatten(x)  # x2: [M, K]
        m = x2.shape[0]
        if self.small_m_max and m > INT_MM_MAX_ROWS and x2.is_cpu and x2.dtype in _INT_KERNEL_DTYPES:
            w = int_linear.int8_dequantize(self.qweight, self._w_scales_flat, x2.dtype)  # [N, K]
            y = F.linear(x2, w)
        elif self.use_kernel and x2.device.type in ("cpu", "cuda"):
            xq, xs = dynamic_quantize_per_token(x2)  # int8 [M, K], fp32 [M, 1]
            if m < _INT_MM_MIN_M:
                xq = F.pad(xq, (0, 0, 0, _INT_MM_MIN_M - m))  # [17, K], zero rows
            acc = torch._int_mm(xq, self.qweight.t())[:m]  # [M, N] int32
            y = (acc.float() * xs * self.w_scales).to(x2.dtype)  # [M, N]
        else:
            y = w8a8_fallback(x2, self.qweight, self.w_scales)  # [M, N]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)


# ----------------------------------------------------------------------------------------------------
# FP8 (E4M3) weights
# ----------------------------------------------------------------------------------------------------


def fp8_e4m3_to_scaled(w_fp8: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float8_e4m3fn [N, K] -> `dtype` holding exactly w * 2**-8, by bit manipulation.

    torch's own fp8 -> bf16 cast is scalar on CPU; this is several times faster (docs/performance.md). E4M3 bits
    s.eeee.mmm placed at fp16 bits 15 and 13..7
    form the fp16 number w * 2**-8 (bias 7 vs 15; E4M3 subnormals land on fp16 subnormals), which
    converts exactly to bf16/fp32. Via int8 sign extension: (int16(b) << 7) has the sign in bits
    15 and 14, so bit 14 is cleared. NaN codes (0x7F/0xFF) become ±1.875 instead; quantize_fp8 clamps,
    so they never occur in quantized weights.
    """
    b = w_fp8.view(torch.int8).to(torch.int16)
    b <<= 7
    b &= ~0x4000
    return b.view(torch.float16).to(dtype)


def fp8_upcast_linear(x2: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """CPU / fallback: y = (x W8^T) * s with W8 upcast to x's dtype. Applying the per-channel scale to the
    [M, N] output instead of the [N, K] weight is the same product and touches M*N, not N*K, elements;
    the 2**8 from fp8_e4m3_to_scaled is folded into the same multiply (exact, a power of two).
    Computed in fp32 whatever x's dtype: the fp16 -> fp32 widening is ~2.5x cheaper than fp16 -> bf16
    here and fp32 F.linear on the fresh weight is no slower. x2 [M, K], w_fp8 [N, K], w_scale [N, 1] or 0-d."""
    y = F.linear(x2.float(), fp8_e4m3_to_scaled(w_fp8, torch.float32))  # [M, N] fp32, = x W8^T * 2**-8
    s = (w_scale.reshape(1, -1) if w_scale.dim() else w_scale).float() * 256.0  # [1, N] or scalar
    return (y.float() * s).to(x2.dtype)


def fp8_scaled_mm_linear(
    x2: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = Q(x) W8^T * scales (+ b) in x's dtype on torch._scaled_mm, x quantized dynamically to E4M3.
    x2 [M, K], w_fp8 [N, K], w_scale [N, 1] or 0-d, bias [N] or None.

    _scaled_mm accepts two scale pairings only: tensor-wise x tensor-wise (both 0-d) and row-wise x
    row-wise (scale_a [M, 1], scale_b [1, N], both stride-1 in the last dim); mixing them is "Invalid
    scaling configuration". So a per-channel weight gets per-token x scales, a per-tensor one a per-tensor
    x scale. The bias is fused into the GEMM (CUDA takes it only with bf16/fp16 out, which
    _scaled_mm_supported ensures). torch 2.13's CPU build runs this too (slower than fp8_upcast_linear,
    see Fp8Linear), which is how tests check it without a GPU.
    """
    if w_scale.dim():
        xs = (x2.abs().float().amax(-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)  # [M, 1]
        sb = w_scale.reshape(1, -1)  # [1, N]
    else:
        xs = (x2.abs().float().amax() / FP8_MAX).clamp(min=1e-12)  # 0-d
        sb = w_scale
    xq = (x2.float() / xs).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)  # [M, K] fp8
    # mat2 must be column-major: weight [N, K] row-major transposed is exactly that
    return torch._scaled_mm(
        xq, w_fp8.t(), scale_a=xs, scale_b=sb, bias=None if bias is None else bias.to(x2.dtype), out_dtype=x2.dtype
    )  # [M, N]


def _scaled_mm_supported(capability: tuple[int, int], k: int, n: int, dtype: torch.dtype, per_channel: bool) -> bool:
    """Whether torch._scaled_mm takes an x [M, K] of `dtype` times a weight [N, K] on a CUDA GPU of this
    compute capability. The rules are _scaled_mm_out_cuda's checks (aten/src/ATen/native/cuda/Blas.cpp):
    SM 8.9 or 9.0+ ("only supported on CUDA devices with compute capability >= 9.0 or 8.9"); K % 16 == 0
    ("Expected trailing dimension of mat1 to be divisible by 16") and N % 16 == 0 ("mat2 shape ... must be
    divisible by 16"), any M; a bias is refused with float32 out, so x must be bf16 or fp16; row-wise scales
    take the CUTLASS kernel below SM90 or cuBLAS 12.9 ("Only bf16 high precision output types are supported
    for row-wise scaling"), so per-channel weights need bf16 x, and that kernel is SM90+ only here (SM89
    gets tensor-wise scales only)."""
    if capability < (8, 9) or k % 16 or n % 16:
        return False
    if per_channel:
        return capability >= (9, 0) and dtype == torch.bfloat16
    return dtype in (torch.bfloat16, torch.float16)


def _cuda_scaled_mm_ok(x2: torch.Tensor, n: int, per_channel: bool) -> bool:
    if x2.device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return _scaled_mm_supported(torch.cuda.get_device_capability(x2.device), x2.shape[1], n, x2.dtype, per_channel)


class Fp8Linear(nn.Module):
    """FP8 E4M3 weights with a per-output-channel ([N, 1]) or per-tensor (0-d) float32 scale.

    Why: int8-sized weights with a floating format (no zero points, friendlier to outliers). This CPU has
    no FP8 matmul units, so the CPU path upcasts the fp8 weight (a bit-trick cast to fp32, far
    faster than torch's scalar fp8 cast) and runs F.linear, applying the scale to the output
    (fp8_upcast_linear) — it saves memory, not time. torch._scaled_mm does run on CPU in torch 2.13, but
    on a 1536x576 weight (bf16 or fp32 x, M = 1 and 32) it measured 7-12x slower than the upcast with
    per-channel (row-wise) scales and 150-2600x slower with a per-tensor scale, so CPU keeps the upcast.
    On CUDA, where _scaled_mm_supported allows (SM >= 89, K and N multiples of 16, bf16/fp16 x), the
    activation is quantized dynamically to FP8 (per tensor, or per token for per-channel weights on
    SM90+) and torch._scaled_mm multiplies on FP8 tensor cores (fp8_scaled_mm_linear). That function is
    tested against the upcast path on CPU (tests/test_fp8_scaled_mm.py); it has not run on a GPU yet.
    """

    def __init__(self, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if w_fp8.dtype != FP8_DTYPE or w_fp8.dim() != 2:
            raise ValueError("w_fp8 must be float8_e4m3fn [N, K]")
        n, k = w_fp8.shape
        self.in_features, self.out_features = k, n
        self.per_channel = w_scale.numel() > 1
        self.register_buffer("weight", w_fp8.contiguous())  # [N, K] fp8
        self.register_buffer(
            "w_scale", w_scale.float().reshape(n, 1) if self.per_channel else w_scale.float().reshape(())
        )
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_quantized(cls, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None) -> Fp8Linear:
        """From engines.quant.fp8.quantize_fp8's (fp8 [N, K], scale [N, 1] or 0-d)."""
        return cls(w_fp8, w_scale, bias)

    @property
    def weight_bytes(self) -> int:
        return self.weight.numel() + self.w_scale.numel() * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = _flatten(x)  # x2: [M, K]
        if _cuda_scaled_mm_ok(x2, self.out_features, self.per_channel):
            y = fp8_scaled_mm_linear(x2, self.weight, self.w_scale, self.bias)  # [M, N], bias fused
        else:
            y = fp8_upcast_linear(x2, self.weight, self.w_scale)  # [M, N]
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)
