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

int4 is stored in the portable nibble order of engines.quant.rtn.pack_int4 and repacked for the
CPU kernel when loaded; loading never quantizes anything.
"""

from __future__ import annotations

import torch
from torch import nn

from engines.quant.rtn import pack_int4, unpack_int4
from engines.quant.types import QuantizedWeight
from engines.torch.layers.linear import DenseLinear, LinearDispatch

FORMATS = ("dense", "int8", "int4", "w8a8", "fp8")


def encode_dense(prefix: str, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {f"{prefix}.weight": weight.to(dtype).contiguous()}
    if bias is not None:
        out[f"{prefix}.bias"] = bias.to(dtype).contiguous()
    return out


def encode_int8(prefix: str, qw: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A per-channel symmetric 8-bit weight (int8 weight-only and SmoothQuant W8A8 store the same)."""
    if qw.bits != 8 or not qw.symmetric or qw.group_size is not None:
        raise ValueError(f"{prefix}: int8 formats need per-channel symmetric 8-bit weights")
    out = {f"{prefix}.qweight": qw.qweight.contiguous(), f"{prefix}.scales": qw.scales.reshape(-1).float().contiguous()}
    return _with_bias(out, prefix, bias, dtype)


def encode_int4(prefix: str, qw: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    if qw.bits != 4 or qw.group_size is None:
        raise ValueError(f"{prefix}: int4 format needs group-wise 4-bit weights")
    out = {f"{prefix}.qweight_packed": pack_int4(qw.qweight), f"{prefix}.scales": qw.scales.float().contiguous()}
    if qw.zeros is not None:
        out[f"{prefix}.zeros"] = qw.zeros.to(torch.int8).contiguous()
    if qw.g_idx is not None:
        out[f"{prefix}.g_idx"] = qw.g_idx.to(torch.int32).contiguous()
    return _with_bias(out, prefix, bias, dtype)


def encode_fp8(prefix: str, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
               dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {f"{prefix}.weight_fp8": w_fp8.contiguous(), f"{prefix}.weight_scale": w_scale.float().contiguous()}
    return _with_bias(out, prefix, bias, dtype)


def _with_bias(out: dict, prefix: str, bias: torch.Tensor | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    if bias is not None:
        out[f"{prefix}.bias"] = bias.to(dtype).contiguous()
    return out


def make_linear(fmt: str, tensors: dict[str, torch.Tensor], prefix: str, dispatch: LinearDispatch,
                dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The runtime module for `prefix`, consuming its tensors from `tensors`."""
    from engines.torch.layers.quantized import Fp8Linear, Int4WeightOnlyLinear, Int8WeightOnlyLinear, W8A8Int8Linear

    def take(field: str, required: bool = True) -> torch.Tensor | None:
        name = f"{prefix}.{field}"
        if name not in tensors:
            if required:
                raise KeyError(f"Weights lack tensor {name!r} (format {fmt}).")
            return None
        return tensors.pop(name).to(device)

    bias = take("bias", required=False)
    bias = None if bias is None else bias.to(dtype)
    if fmt == "dense":
        return DenseLinear(take("weight").to(dtype), bias, dispatch)
    if fmt == "int8":
        return Int8WeightOnlyLinear(take("qweight"), take("scales"), bias)
    if fmt == "w8a8":
        return W8A8Int8Linear(take("qweight"), take("scales"), bias)
    if fmt == "int4":
        packed, scales = take("qweight_packed"), take("scales")
        zeros, g_idx = take("zeros", required=False), take("g_idx", required=False)
        k = packed.shape[1] * 2
        if k % scales.shape[1]:
            raise ValueError(f"{prefix}: {scales.shape[1]} groups do not divide K={k}.")
        qw = QuantizedWeight(unpack_int4(packed, signed=True), scales, zeros, 4, k // scales.shape[1],
                             zeros is None, g_idx)
        return Int4WeightOnlyLinear(qw, bias)
    if fmt == "fp8":
        return Fp8Linear(take("weight_fp8"), take("weight_scale"), bias)
    raise ValueError(f"{prefix}: unknown weight format {fmt!r}; kiln knows {', '.join(FORMATS)}.")
