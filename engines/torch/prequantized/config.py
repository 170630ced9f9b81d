"""What the format readers share: a quantization_config field read with the values kiln accepts, the refusal of
one, and the float module (or the missing tensor) behind a module name that carries no quantized tensors."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from engines.torch.checkpoint_tensors import CheckpointTensors
from engines.torch.prequantized.weights import DenseWeight


class QuantConfigError(ValueError):
    """A quantization_config kiln does not read (its message names the field)."""


def field(config: dict, name: str, allowed: Iterable, *aliases: str):
    """config[name] (or the first alias present), which must be one of `allowed`."""
    allowed = tuple(allowed)
    value = next((config[key] for key in (name, *aliases) if key in config), None)
    if value not in allowed:
        raise QuantConfigError(
            f"quantization_config.{name} is {value!r}; kiln reads {', '.join(repr(a) for a in allowed)}."
        )
    return value


def dense_or_missing(ckpt: CheckpointTensors, module: str, quantized_field: str, dtype: torch.dtype) -> DenseWeight:
    """A module the quantizer left in float (an LM head, an ignored layer), else the quantized tensor it lacks."""
    weight = ckpt.take_optional(f"{module}.weight")
    if weight is None or not weight.is_floating_point() or weight.element_size() == 1:
        raise KeyError(f"Checkpoint in {ckpt.folder} lacks tensor {f'{module}.{quantized_field}'!r}.")
    return DenseWeight(weight.to(dtype))


def take_int32(ckpt: CheckpointTensors, name: str) -> torch.Tensor:
    tensor = ckpt.take(name)
    if tensor.dtype != torch.int32 or tensor.dim() != 2:
        raise ValueError(f"{name} is {tensor.dtype} {list(tensor.shape)}; packed codes are 2-d int32.")
    return tensor
