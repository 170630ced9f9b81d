"""Round-to-nearest (RTN) integer weight quantization and portable INT4 packing.

Also the shared quantization primitives (`compute_qparams`, `quantize_codes`) that AWQ and GPTQ reuse,
so all three produce codes with identical conventions (see QuantizedWeight).
"""

from __future__ import annotations

import torch

from engines.quant.types import QuantizedWeight


def qrange(bits: int) -> tuple[int, int]:
    """Signed code range used for every mode: [-2**(bits-1), 2**(bits-1) - 1]."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8], got {bits}")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def compute_qparams(w: torch.Tensor, bits: int, symmetric: bool, clip_ratio: torch.Tensor | float | None = None):
    """Scale and zero point for each slice of `w` reduced over its last dim.

    w: [..., g] -> scale [...] float32, zero [...] float32 holding integers (or None when symmetric).
    clip_ratio (broadcastable to [...]) shrinks the range before computing the scale (AWQ's clip search).
    """
    lo, hi = qrange(bits)
    w = w.float()
    if symmetric:
        amax = w.abs().amax(dim=-1)
        if clip_ratio is not None:
            amax = amax * clip_ratio
        # hi, not -lo: keeps +amax representable, so the error bound is scale/2 everywhere
        scale = (amax / hi).clamp(min=1e-10)
        return scale, None
    wmin = w.amin(dim=-1).clamp(max=0)
    wmax = w.amax(dim=-1).clamp(min=0)
    if clip_ratio is not None:
        wmin, wmax = wmin * clip_ratio, wmax * clip_ratio
    scale = ((wmax - wmin) / (hi - lo)).clamp(min=1e-10)
    zero = torch.round(-wmin / scale) + lo  # shifted into the signed range, like the codes
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Integer codes (as float) for `w` with broadcastable scale / zero."""
    lo, hi = qrange(bits)
    q = torch.round(w.float() / scale)
    if zero is not None:
        q = q + zero
    return q.clamp(lo, hi)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    if zero is not None:
        q = q - zero
    return q * scale


def fake_quantize(
    w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, clip_ratio: torch.Tensor | float | None = None
) -> torch.Tensor:
    """quantize-then-dequantize in float32, same layout rules as quantize_rtn (used by AWQ's searches).

    clip_ratio, when a tensor, is shaped like the scales: [N, K // group_size] or [N, 1].
    """
    wg = _grouped(w, group_size)  # [N, G, g]
    if isinstance(clip_ratio, torch.Tensor):
        clip_ratio = clip_ratio.reshape(wg.shape[:2])
    scale, zero = compute_qparams(wg, bits, symmetric, clip_ratio)
    scale = scale.unsqueeze(-1)
    zero = None if zero is None else zero.unsqueeze(-1)
    return dequantize_codes(quantize_codes(wg, scale, zero, bits), scale, zero).reshape(w.shape)


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    # w: [N, K] -> [N, G, g]; per-channel is a single group of K
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D [out_features, in_features] weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    if group_size is None:
        return w.reshape(n, 1, k)
    if group_size <= 0 or k % group_size != 0:
        raise ValueError(f"group_size {group_size} must be a positive divisor of in_features K={k}")
    return w.reshape(n, k // group_size, group_size)


def quantize_rtn(
    w: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = True,
    clip_ratio: torch.Tensor | float | None = None,
) -> QuantizedWeight:
    """Round-to-nearest quantization of an [N, K] weight, per output channel or group-wise along K."""
    wg = _grouped(w, group_size)  # [N, G, g]
    if isinstance(clip_ratio, torch.Tensor):
        clip_ratio = clip_ratio.reshape(wg.shape[:2])
    scale, zero = compute_qparams(wg, bits, symmetric, clip_ratio)  # [N, G]
    q = quantize_codes(wg, scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1), bits)
    return QuantizedWeight(
        qweight=q.reshape(w.shape).to(torch.int8),
        scales=scale,
        zeros=None if zero is None else zero.to(torch.int8),
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
    )


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """float32 [N, K] weight back from a QuantizedWeight."""
    n, k = qw.qweight.shape
    q = qw.qweight.float()
    if qw.g_idx is not None:
        idx = qw.g_idx.long()
        scale = qw.scales[:, idx]
        zero = None if qw.zeros is None else qw.zeros[:, idx].float()
        return dequantize_codes(q, scale, zero)
    g = k if qw.group_size is None else qw.group_size
    qg = q.reshape(n, k // g, g)
    zero = None if qw.zeros is None else qw.zeros.float().unsqueeze(-1)
    return dequantize_codes(qg, qw.scales.unsqueeze(-1), zero).reshape(n, k)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit values, two per byte, along the last dim.

    Portable layout: byte j of a row holds element 2j in its low nibble and element 2j+1 in its high
    nibble (little-endian nibble order, as in llama.cpp / safetensors consumers). Signed values in
    [-8, 7] are stored as 4-bit two's complement; unsigned values in [0, 15] as-is. The last dim must be
    even. q: int8/uint8/int [..., K] -> uint8 [..., K // 2].
    """
    if q.shape[-1] % 2:
        raise ValueError(f"last dim must be even to pack int4, got {q.shape[-1]}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 15):
        raise ValueError("values out of 4-bit range")
    nib = q.to(torch.int16) & 0xF
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [..., K // 2] -> int8 [..., K] (signed) or uint8 (unsigned)."""
    p = packed.to(torch.int16)
    nib = torch.stack([p & 0xF, (p >> 4) & 0xF], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    if signed:
        return torch.where(nib >= 8, nib - 16, nib).to(torch.int8)
    return nib.to(torch.uint8)
