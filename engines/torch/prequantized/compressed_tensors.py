"""compressed-tensors checkpoints (quant_method "compressed-tensors", what llm-compressor writes). Each config group
of quantization_config.config_groups names its targets (the class name "Linear", a module name, or "re:" and a
regex matched from the start of the name, as compressed_tensors.utils.match.match_name) and its weight
quantization (num_bits, type int or float, symmetric, strategy tensor/channel/group, group_size); "ignore" lists the
modules left in float. What a module stores says its compression format:

- pack-quantized (PackedQuantizationCompressor.compress): weight_packed int32 [N, K * bits / 32], signed codes
  offset by 2**(bits-1) and packed along K lowest bits first (pack_to_int32); weight_shape [N, K]; weight_scale
  [N, G] (group), [N, 1] (channel) or [1] (tensor); asymmetric: weight_zero_point, packed the same way along N
  ([N * bits / 32, G], compressed-tensors >= 0.10) or as int8 [N, G] (older releases)
- int-quantized / naive-quantized int (NaiveQuantizationCompressor): weight int8 [N, K], weight_scale as above
- float-quantized (the same compressor, type float): weight float8_e4m3fn [N, K], weight_scale [N, 1] or [1]

w = (q - zero) * scale (compressed_tensors.quantization.lifecycle.forward.dequantize). Activation quantization
(input_activations; static ones store input_scale, taken in prequantized/__init__.py FusedLinearReader) is not
applied: kiln runs these weights with float activations (int8, int4) or as Fp8Linear does (fp8).
"""

from __future__ import annotations

import re

import torch

from engines.torch.checkpoint_tensors import CheckpointTensors
from engines.torch.prequantized.config import QuantConfigError, dense_or_missing, take_int32
from engines.torch.prequantized.fp8 import fp8_weight
from engines.torch.prequantized.packing import unpack_int32
from engines.torch.prequantized.weights import StoredWeight, int_weight

FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized", "mixed-precision")
STRATEGIES = ("tensor", "channel", "group")


def _matches(module: str, target: str) -> bool:
    if target == "Linear":  # every module kiln reads through here is an nn.Linear
        return True
    if target.startswith("re:"):
        return re.match(target.removeprefix("re:"), module) is not None
    return target == module


class CompressedTensorsReader:
    def __init__(self, config: dict):
        fmt = config.get("format")
        if fmt not in FORMATS:
            raise QuantConfigError(f"quantization_config.format is {fmt!r}; kiln reads {', '.join(FORMATS)}.")
        groups = config.get("config_groups") or {}
        if not groups:
            raise QuantConfigError("quantization_config.config_groups is empty; it says how each module is quantized.")
        self.groups: list[tuple[str, list[str], dict]] = []
        for name, group in groups.items():
            weights = group.get("weights") or {}
            where = f"quantization_config.config_groups.{name}.weights"
            if weights.get("type") not in ("int", "float"):
                raise QuantConfigError(f"{where}.type is {weights.get('type')!r}; kiln reads 'int' and 'float'.")
            if weights.get("num_bits") not in ((4, 8) if weights["type"] == "int" else (8,)):
                raise QuantConfigError(
                    f"{where}.num_bits is {weights.get('num_bits')!r}; kiln reads int4, int8 and fp8."
                )
            if weights.get("strategy") not in STRATEGIES:
                raise QuantConfigError(
                    f"{where}.strategy is {weights.get('strategy')!r}; kiln reads {', '.join(STRATEGIES)}."
                )
            self.groups.append((name, list(group.get("targets") or []), weights))
        self.ignore = list(config.get("ignore") or [])

    def _weights_args(self, module: str) -> dict | None:
        if any(_matches(module, target) for target in self.ignore):
            return None
        return next((weights for _, targets, weights in self.groups if any(_matches(module, t) for t in targets)), None)

    def read(self, ckpt: CheckpointTensors, module: str, dtype: torch.dtype) -> StoredWeight:
        args = self._weights_args(module)
        if args is None:
            return dense_or_missing(ckpt, module, "weight", dtype)
        if f"{module}.weight_scale" not in ckpt:
            return dense_or_missing(ckpt, module, "weight_scale", dtype)
        scale = ckpt.take(f"{module}.weight_scale")
        if args["type"] == "float":
            return fp8_weight(ckpt.take(f"{module}.weight"), scale, module)
        bits = args["num_bits"]
        zero_point = ckpt.take_optional(f"{module}.weight_zero_point")
        if f"{module}.weight_packed" in ckpt:
            packed = take_int32(ckpt, f"{module}.weight_packed")
            shape = ckpt.take(f"{module}.weight_shape").tolist()
            n, k = shape
            q = unpack_int32(packed, bits, dim=1)[:, :k] - (1 << (bits - 1))  # [N, K] signed
            if tuple(q.shape) != (n, k):
                raise ValueError(f"{module}.weight_packed unpacks to {list(q.shape)}; weight_shape says {shape}.")
        else:
            q = ckpt.take(f"{module}.weight")
            if q.dtype != torch.int8 or q.dim() != 2:
                raise ValueError(
                    f"{module}.weight is {q.dtype} {list(q.shape)}; int-quantized weights are int8 [N, K]."
                )
            n, k = q.shape
        if scale.numel() != 1 and (scale.dim() != 2 or scale.shape[0] != n):
            raise ValueError(
                f"{module}.weight_scale has shape {list(scale.shape)}; a [{n}, {k}] weight needs [{n}, G]."
            )
        scales = scale.reshape(1, 1).expand(n, 1) if scale.numel() == 1 else scale
        z = None
        if zero_point is not None and not args.get("symmetric", True):
            if zero_point.dtype == torch.int32 and zero_point.shape[0] != n:  # packed along N (>= 0.10)
                zero_point = unpack_int32(zero_point, bits, dim=0)[:n] - (1 << (bits - 1))
            z = zero_point.reshape(1, 1).expand(n, 1) if zero_point.numel() == 1 else zero_point  # shape: int_weight
        return int_weight(q, z, scales, bits, None, module)
