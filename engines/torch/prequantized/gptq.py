"""GPTQ checkpoints as AutoGPTQ and GPTQModel write them (quant_method "gptq"), per quantized nn.Linear [N, K]:

- qweight int32 [K * bits / 32, N]: codes packed along K, lowest bits first (AutoGPTQ qlinear_cuda_old.QuantLinear.pack)
- qzeros int32 [G, N * bits / 32]: zero points packed along N the same way
- scales fp16 [G, N]; g_idx int32 [K]: the group of each input column (k // group_size unless desc_act reordered them)
- w[n, k] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])

checkpoint_format "gptq" (v1, AutoGPTQ's and GPTQModel's default on disk) stores each zero point minus one
(QuantLinear.pack's `zeros -= 1`; its forward adds the one back after masking the bits), so a symmetric 4-bit weight
stores 7 for its zero of 8. GPTQModel's "gptq_v2" stores the zero points as they are. `sym` and `desc_act` need no
reading: the zero points and g_idx say the same per tensor.
"""

from __future__ import annotations

import torch

from engines.torch.checkpoint_tensors import CheckpointTensors
from engines.torch.prequantized.config import QuantConfigError, dense_or_missing, field, take_int32
from engines.torch.prequantized.packing import unpack_int32
from engines.torch.prequantized.weights import StoredWeight, int_weight

ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}


class GptqReader:
    def __init__(self, config: dict):
        self.bits = field(config, "bits", (4, 8))
        group_size = config.get("group_size", -1)
        if not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
            raise QuantConfigError(f"quantization_config.group_size {group_size!r} is neither -1 nor a group size.")
        self.group_size = group_size
        checkpoint_format = config.get("checkpoint_format") or "gptq"
        if checkpoint_format not in ZERO_OFFSET:
            raise QuantConfigError(
                f"quantization_config.checkpoint_format {checkpoint_format!r} is not one kiln reads "
                f"({', '.join(ZERO_OFFSET)})."
            )
        self.zero_offset = ZERO_OFFSET[checkpoint_format]

    def read(self, ckpt: CheckpointTensors, module: str, dtype: torch.dtype) -> StoredWeight:
        if f"{module}.qweight" not in ckpt:
            return dense_or_missing(ckpt, module, "qweight", dtype)
        mid = 1 << (self.bits - 1)
        codes = unpack_int32(take_int32(ckpt, f"{module}.qweight"), self.bits, dim=0)  # [K, N] unsigned
        zeros = unpack_int32(take_int32(ckpt, f"{module}.qzeros"), self.bits, dim=1)  # [G, N] stored
        scales = ckpt.take(f"{module}.scales")  # [G, N]
        g_idx = ckpt.take_optional(f"{module}.g_idx")
        k, n = codes.shape
        if scales.shape[-1] != n or zeros.shape != scales.shape:
            raise ValueError(
                f"{module}.scales has shape {list(scales.shape)} and {module}.qzeros unpacks to {list(zeros.shape)}; "
                f"a [{k // (32 // self.bits)}, {n}] qweight needs [G, {n}] for both."
            )
        groups = 1 if self.group_size == -1 else -(-k // self.group_size)
        if scales.shape[0] != groups:
            raise ValueError(
                f"{module}.scales has {scales.shape[0]} groups; group_size {self.group_size} over K={k} makes {groups}."
            )
        q = (codes - mid).t()  # [N, K] signed
        z = (zeros + self.zero_offset - mid).t()  # [N, G] signed, v1's minus one undone
        return int_weight(q, z, scales.t(), self.bits, g_idx, module)
