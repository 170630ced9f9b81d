"""A projection's stored weight once a format reader has decoded it (codes in kiln's convention, no float copy),
how the checkpoint modules kiln fuses into one projection (q/k/v, gate/up) join by rows, and the tensors each
becomes under kiln's stored-format names (engines/torch/layers/formats.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engines.quant.types import QuantizedWeight
from engines.torch.layers import formats


@dataclass
class DenseWeight:
    weight: torch.Tensor  # [N, K] in the serving dtype
    format = "dense"

    def encode(self, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return formats.encode_dense(prefix, self.weight, None, dtype)


@dataclass
class IntWeight:
    """Integer codes as engines/quant/types.py QuantizedWeight keeps them: signed codes, zeros shifted alike,
    w = (q - z[group]) * s[group]. 4 bits are kiln's int4 format (group-wise; one group of K for a per-channel
    checkpoint), 8 bits its int8 format (per channel, symmetric: what kiln's int8 layer runs)."""

    qw: QuantizedWeight

    @property
    def format(self) -> str:
        return "int4" if self.qw.bits == 4 else "int8"

    def encode(self, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if self.qw.bits == 4:
            return formats.encode_int4(prefix, self.qw, None, dtype)
        return formats.encode_int8(prefix, self.qw, None, dtype)


@dataclass
class Fp8Weight:
    weight: torch.Tensor  # float8_e4m3fn [N, K]
    scale: torch.Tensor  # float32, 0-d (per tensor) or [N, 1] (per output channel)
    format = "fp8"

    def encode(self, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return formats.encode_fp8(prefix, self.weight, self.scale, None, dtype)


StoredWeight = DenseWeight | IntWeight | Fp8Weight


def fuse(parts: list[StoredWeight], prefix: str) -> StoredWeight:
    """The parts' rows concatenated, each row keeping its own scales and zeros."""
    if len(parts) == 1:
        return parts[0]
    kinds = {p.format for p in parts}
    if len(kinds) > 1:
        raise ValueError(
            f"{prefix} fuses checkpoint modules stored as {' and '.join(sorted(kinds))}; kiln fuses alike ones."
        )
    # one of these holds every part (the formats are alike)
    dense = [p for p in parts if isinstance(p, DenseWeight)]
    fp8 = [p for p in parts if isinstance(p, Fp8Weight)]
    ints = [p.qw for p in parts if isinstance(p, IntWeight)]
    if dense:
        return DenseWeight(torch.cat([p.weight for p in dense]))
    if fp8:
        return _fuse_fp8(fp8)
    return IntWeight(_fuse_int(ints, prefix))


def _fuse_fp8(parts: list[Fp8Weight]) -> Fp8Weight:
    scales = [p.scale for p in parts]
    if all(s.dim() == 0 for s in scales) and all(torch.equal(s, scales[0]) for s in scales):
        return Fp8Weight(torch.cat([p.weight for p in parts]), scales[0])
    # per-tensor scales that differ (q, k and v each have their own) become one scale per row: exact, where vLLM
    # requantizes the parts to their largest scale
    rows = [s.expand(p.weight.shape[0]).reshape(-1, 1) if s.dim() == 0 else s for p, s in zip(parts, scales)]
    return Fp8Weight(torch.cat([p.weight for p in parts]), torch.cat(rows))


def _fuse_int(parts: list[QuantizedWeight], prefix: str) -> QuantizedWeight:
    first = parts[0]
    if any(p.bits != first.bits or p.group_size != first.group_size for p in parts):
        raise ValueError(f"{prefix} fuses checkpoint modules with different bits or group sizes.")
    g_idx = first.g_idx
    if any(not _same_g_idx(p.g_idx, g_idx) for p in parts):
        # kiln's int4 layer permutes its input columns once per projection; GPTQ's act-order gives q/k/v (gate/up)
        # the same order, since they quantize the same inputs, and a checkpoint where they differ is refused
        raise ValueError(f"{prefix} fuses checkpoint modules whose act-order g_idx differ; kiln needs them equal.")
    symmetric = all(p.symmetric for p in parts)
    zeros = None
    if not symmetric:  # a symmetric part's zero is 0 in kiln's shifted convention
        zeros = torch.cat([torch.zeros_like(p.scales, dtype=torch.int8) if p.zeros is None else p.zeros for p in parts])
    return QuantizedWeight(
        torch.cat([p.qweight for p in parts]),
        torch.cat([p.scales for p in parts]),
        zeros,
        first.bits,
        first.group_size,
        symmetric,
        g_idx,
    )


def int_weight(
    q: torch.Tensor, z: torch.Tensor | None, scales: torch.Tensor, bits: int, g_idx: torch.Tensor | None, module: str
) -> IntWeight:
    """IntWeight from signed codes q [N, K], signed zeros z [N, G] (None: symmetric), scales [N, G] and the group of
    each input column (None: column k is in group k // (K / G))."""
    n, k = q.shape
    groups = scales.shape[1]
    if scales.shape[0] != n or k % groups:
        raise ValueError(f"{module}: scales of shape {list(scales.shape)} do not fit a [{n}, {k}] weight.")
    if z is not None and tuple(z.shape) != tuple(scales.shape):
        raise ValueError(f"{module}: zero points of shape {list(z.shape)} do not match scales {list(scales.shape)}.")
    if z is not None and not z.any():
        z = None  # all zeros at the midpoint: a symmetric weight
    group_size = k // groups
    if g_idx is not None:
        if tuple(g_idx.shape) != (k,):
            raise ValueError(f"{module}.g_idx has shape {list(g_idx.shape)}; the weight has {k} input columns.")
        if torch.equal(g_idx.long(), torch.arange(k) // group_size):
            g_idx = None  # groups in column order: no permutation to run
    scales = scales.float().contiguous()
    if bits == 8:
        if groups != 1 or z is not None or g_idx is not None:
            raise ValueError(
                f"{module}: 8-bit weights with groups, zero points or act-order have no kiln runtime format "
                "(kiln's int8 layer takes per-channel symmetric weights)."
            )
        return IntWeight(QuantizedWeight(q.to(torch.int8).contiguous(), scales, None, 8, None, True))
    zeros = None if z is None else z.to(torch.int8).contiguous()
    g = None if g_idx is None else g_idx.to(torch.int32)
    return IntWeight(QuantizedWeight(q.to(torch.int8).contiguous(), scales, zeros, 4, group_size, z is None, g))


def _same_g_idx(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
