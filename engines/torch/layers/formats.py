"""Stored weight formats of an engine's projections: the tensors each format writes into
weights.safetensors (encode_*) and the runtime module each becomes at load (make_linear).

Names are `<prefix>.<field>` with prefix e.g. `layers.3.qkv_proj` or `lm_head`:

| format | tensors                                                              | module                 |
|--------|----------------------------------------------------------------------|------------------------|
| dense  | weight [N, K] model dtype, bias?                                     | DenseLinear            |
| int8   | qweight int8 [N, K], scales f32 [N], bias?                           | Int8WeightOnlyLinear   |
| int4   | qweight_packed u8 [N, K/2] (pack_int4), scales f32 [N, G],           | Int4WeightOnlyLinear   |
|        | zeros int8 [N, G] (asymmetric only), g_idx int32 [K] (act-order), bias? |                     |
| w8a8   | qweight int8 [N, K], scales f32 [N], bias?                           | W8A8Int8Linear         |
| fp8    | weight_fp8 e4m3 [N, K], weight_scale f32 [N, 1] or [], bias?        | Fp8Linear              |
| int4-affine | qweight_packed u8 [N, Kp/2] (kernel layout of u - 8), dm f16 [N, K/32, 2], bias? | AffineInt4Linear |

int4 is stored in the portable nibble order of engines.quant.rtn.pack_int4 and repacked for the
CPU kernel when loaded; loading never quantizes anything.

Each format is a WeightFormat in a registry by name (the name the manifest's weight_formats records);
a quantization scheme (engines/schemes) that stores a new layout brings its WeightFormat along and
registering the scheme registers it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from engines.quant.rtn import pack_int4, unpack_int4
from engines.quant.types import QuantizedWeight
from engines.torch.layers.linear import DenseLinear, LinearDispatch


def encode_dense(
    prefix: str, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    out = {f"{prefix}.weight": weight.to(dtype).contiguous()}
    if bias is not None:
        out[f"{prefix}.bias"] = bias.to(dtype).contiguous()
    return out


def encode_int8(
    prefix: str, qw: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """A per-channel symmetric 8-bit weight (int8 weight-only and SmoothQuant W8A8 store the same)."""
    if qw.bits != 8 or not qw.symmetric or qw.group_size is not None:
        raise ValueError(f"{prefix}: int8 formats need per-channel symmetric 8-bit weights")
    out = {f"{prefix}.qweight": qw.qweight.contiguous(), f"{prefix}.scales": qw.scales.reshape(-1).float().contiguous()}
    return _with_bias(out, prefix, bias, dtype)


def encode_int4(
    prefix: str, qw: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    if qw.bits != 4 or qw.group_size is None:
        raise ValueError(f"{prefix}: int4 format needs group-wise 4-bit weights")
    out = {f"{prefix}.qweight_packed": pack_int4(qw.qweight), f"{prefix}.scales": qw.scales.float().contiguous()}
    if qw.zeros is not None:
        out[f"{prefix}.zeros"] = qw.zeros.to(torch.int8).contiguous()
    if qw.g_idx is not None:
        out[f"{prefix}.g_idx"] = qw.g_idx.to(torch.int32).contiguous()
    return _with_bias(out, prefix, bias, dtype)


def encode_fp8(
    prefix: str, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    out = {f"{prefix}.weight_fp8": w_fp8.contiguous(), f"{prefix}.weight_scale": w_scale.float().contiguous()}
    return _with_bias(out, prefix, bias, dtype)


def _with_bias(out: dict, prefix: str, bias: torch.Tensor | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    if bias is not None:
        out[f"{prefix}.bias"] = bias.to(dtype).contiguous()
    return out


@dataclass(frozen=True)
class StoredLayer:
    """One projection's stored tensors as a format's `load` sees them."""

    take: Callable[[str], torch.Tensor]  # pops `<prefix>.<field>` onto the target device, KeyError if missing
    take_optional: Callable[[str], torch.Tensor | None]
    prefix: str
    bias: torch.Tensor | None  # already in `dtype`
    dispatch: LinearDispatch
    dtype: torch.dtype


class WeightFormat:
    """A stored weight layout: its name in the manifest and the runtime module it becomes at load."""

    name: ClassVar[str]

    def load(self, layer: StoredLayer) -> nn.Module:
        """The runtime module for `layer.prefix`."""
        raise NotImplementedError


class Dense(WeightFormat):
    name = "dense"

    def load(self, layer: StoredLayer) -> nn.Module:
        return DenseLinear(layer.take("weight").to(layer.dtype), layer.bias, layer.dispatch)


class Int8(WeightFormat):
    name = "int8"

    def load(self, layer: StoredLayer) -> nn.Module:
        from engines.torch.layers.quantized import Int8WeightOnlyLinear

        return Int8WeightOnlyLinear(layer.take("qweight"), layer.take("scales"), layer.bias)


class W8A8(WeightFormat):
    name = "w8a8"

    def load(self, layer: StoredLayer) -> nn.Module:
        from engines.torch.layers.quantized import W8A8Int8Linear

        return W8A8Int8Linear(layer.take("qweight"), layer.take("scales"), layer.bias)


class Int4(WeightFormat):
    name = "int4"

    def load(self, layer: StoredLayer) -> nn.Module:
        from engines.torch.layers.quantized import Int4WeightOnlyLinear

        packed, scales = layer.take("qweight_packed"), layer.take("scales")
        zeros, g_idx = layer.take_optional("zeros"), layer.take_optional("g_idx")
        k = packed.shape[1] * 2
        if k % scales.shape[1]:
            raise ValueError(f"{layer.prefix}: {scales.shape[1]} groups do not divide K={k}.")
        qw = QuantizedWeight(
            unpack_int4(packed, signed=True), scales, zeros, 4, k // scales.shape[1], zeros is None, g_idx
        )
        return Int4WeightOnlyLinear(qw, layer.bias)


class Fp8(WeightFormat):
    name = "fp8"

    def load(self, layer: StoredLayer) -> nn.Module:
        from engines.torch.layers.quantized import Fp8Linear

        return Fp8Linear(layer.take("weight_fp8"), layer.take("weight_scale"), layer.bias)


GGUF_BLOCK = 32  # weights per (d, m) pair in GGUF's Q4_1 blocks


class AffineInt4(WeightFormat):
    """GGUF Q4_1 blocks (engines/torch/gguf_blocks.py): loaded at serve time from the GGUF file, never written."""

    name = "int4-affine"

    def load(self, layer: StoredLayer) -> nn.Module:
        from engines.torch.layers.affine_int4 import AffineInt4Linear

        return AffineInt4Linear(layer.take("qweight_packed"), layer.take("dm"), GGUF_BLOCK, layer.bias)


_FORMATS: dict[str, WeightFormat] = {f.name: f for f in (Dense(), Int8(), Int4(), W8A8(), Fp8(), AffineInt4())}


def register_format(weight_format: WeightFormat) -> None:
    if weight_format.name in _FORMATS and _FORMATS[weight_format.name] is not weight_format:
        raise ValueError(f"weight format {weight_format.name!r} is already registered")
    _FORMATS[weight_format.name] = weight_format


def unregister_format(name: str) -> None:
    _FORMATS.pop(name, None)


def make_linear(
    fmt: str,
    tensors: dict[str, torch.Tensor],
    prefix: str,
    dispatch: LinearDispatch,
    dtype: torch.dtype,
    device: torch.device,
) -> nn.Module:
    """The runtime module for `prefix`, consuming its tensors from `tensors`."""
    if fmt not in _FORMATS:
        raise ValueError(f"{prefix}: unknown weight format {fmt!r}; kiln knows {', '.join(_FORMATS)}.")

    def take_optional(field: str) -> torch.Tensor | None:
        name = f"{prefix}.{field}"
        return tensors.pop(name).to(device) if name in tensors else None

    def take(field: str) -> torch.Tensor:
        tensor = take_optional(field)
        if tensor is None:
            name = f"{prefix}.{field}"
            raise KeyError(f"Weights lack tensor {name!r} (format {fmt}).")
        return tensor

    bias = take_optional("bias")
    bias_in_dtype = None if bias is None else bias.to(dtype)
    return _FORMATS[fmt].load(StoredLayer(take, take_optional, prefix, bias_in_dtype, dispatch, dtype))
