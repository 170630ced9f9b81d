"""FP8 checkpoints with quant_method "fp8" (vLLM's Fp8Config; AutoFP8 and llm-compressor's older exports), per
quantized nn.Linear [N, K]: weight float8_e4m3fn [N, K] and weight_scale float32, one per tensor ([] or [1]) or
per output channel ([N] or [N, 1]); w = weight * weight_scale. input_scale (activation_scheme "static") is taken
and not applied (prequantized/__init__.py FusedLinearReader): kiln runs these weights with float activations (CPU) or
quantizes them per step (CUDA, Fp8Linear).

transformers' FineGrainedFP8 checkpoints scale 128x128 blocks (weight_block_size, weight_scale_inv [N/128, K/128]);
kiln has no block-scaled runtime layer and refuses them rather than dequantizing to float.
"""

from __future__ import annotations

import torch

from engines.quant.fp8 import FP8_DTYPE
from engines.torch.checkpoint_tensors import CheckpointTensors
from engines.torch.prequantized.config import QuantConfigError, dense_or_missing
from engines.torch.prequantized.weights import Fp8Weight, StoredWeight

BLOCKWISE = (
    "block-wise FP8 ({what}) has no kiln runtime format; kiln serves FP8 weights scaled per tensor or per channel."
)


def fp8_weight(weight: torch.Tensor, scale: torch.Tensor, module: str) -> Fp8Weight:
    """weight e4m3 [N, K] with a per-tensor or per-channel scale; any other scale shape is refused by name."""
    if weight.dtype != FP8_DTYPE or weight.dim() != 2:
        raise ValueError(
            f"{module}.weight is {weight.dtype} {list(weight.shape)}; FP8 weights are float8_e4m3fn [N, K]."
        )
    n = weight.shape[0]
    if scale.numel() == 1:
        return Fp8Weight(weight, scale.float().reshape(()))
    if scale.numel() == n and scale.dim() <= 2 and scale.shape[0] == n:
        return Fp8Weight(weight, scale.float().reshape(n, 1))
    raise ValueError(
        f"{module}.weight_scale has shape {list(scale.shape)}; kiln reads one scale per tensor or per output "
        f"channel ([{n}, 1]), not " + BLOCKWISE.format(what="scales per block")
    )


class Fp8Reader:
    def __init__(self, config: dict):
        if config.get("weight_block_size"):
            raise QuantConfigError(
                BLOCKWISE.format(what=f"quantization_config.weight_block_size {config['weight_block_size']}")
            )

    def read(self, ckpt: CheckpointTensors, module: str, dtype: torch.dtype) -> StoredWeight:
        if f"{module}.weight_scale_inv" in ckpt:
            raise ValueError(BLOCKWISE.format(what=f"{module}.weight_scale_inv"))
        if f"{module}.weight_scale" not in ckpt:
            return dense_or_missing(ckpt, module, "weight_scale", dtype)
        scale = ckpt.take(f"{module}.weight_scale")
        return fp8_weight(ckpt.take(f"{module}.weight"), scale, module)
