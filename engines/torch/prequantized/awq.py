"""AWQ checkpoints in AutoAWQ's GEMM packing (quant_method "awq", version "gemm"), per quantized nn.Linear [N, K]:

- qweight int32 [K, N / 8]: 4-bit codes packed along N, eight output columns per word, column AWQ_ORDER[j] of the
  eight at bits [4j, 4j + 4) (AutoAWQ's WQLinear_GEMM.from_linear; unpacked by awq/utils/packing_utils.py
  unpack_awq and reverse_awq_order, whose AWQ_REVERSE_ORDER is the inverse permutation used here)
- qzeros int32 [G, N / 8]: the zero points packed the same way, stored as they are (no GPTQ v1 offset)
- scales fp16 [G, N]; groups of group_size consecutive input columns (no act-order)
- w[n, k] = scales[k // group_size, n] * (q[k, n] - zero[k // group_size, n])  (packing_utils.dequantize_gemm)
"""

from __future__ import annotations

import torch

from engines.torch.checkpoint_tensors import CheckpointTensors
from engines.torch.prequantized.config import QuantConfigError, dense_or_missing, field, take_int32
from engines.torch.prequantized.packing import unpack_int32
from engines.torch.prequantized.weights import StoredWeight, int_weight

BITS = 4
# the packed slot of output column j of each eight (from_linear packs column [0, 2, 4, 6, 1, 3, 5, 7][i] in slot i)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def awq_columns(codes: torch.Tensor) -> torch.Tensor:
    """[R, N] codes in AWQ's packed slot order -> the same codes in output column order."""
    n = codes.shape[1]
    slots = torch.arange(n).view(-1, 8)[:, list(AWQ_REVERSE_ORDER)].reshape(-1)
    return codes[:, slots]


class AwqReader:
    def __init__(self, config: dict):
        field(config, "bits", (BITS,), "w_bit")
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise QuantConfigError(f"quantization_config.version is {version!r}; kiln reads AWQ's 'gemm' packing.")
        if config.get("zero_point", True) is not True:
            raise QuantConfigError("quantization_config.zero_point is false; kiln reads AWQ's GEMM weights with zeros.")

    def read(self, ckpt: CheckpointTensors, module: str, dtype: torch.dtype) -> StoredWeight:
        if f"{module}.qweight" not in ckpt:
            return dense_or_missing(ckpt, module, "qweight", dtype)
        mid = 1 << (BITS - 1)
        codes = awq_columns(unpack_int32(take_int32(ckpt, f"{module}.qweight"), BITS, dim=1))  # [K, N] unsigned
        zeros = awq_columns(unpack_int32(take_int32(ckpt, f"{module}.qzeros"), BITS, dim=1))  # [G, N] unsigned
        scales = ckpt.take(f"{module}.scales")  # [G, N]
        if tuple(scales.shape) != tuple(zeros.shape) or scales.shape[1] != codes.shape[1]:
            raise ValueError(
                f"{module}.scales has shape {list(scales.shape)} and {module}.qzeros unpacks to {list(zeros.shape)}; "
                f"a qweight of {codes.shape[1]} output columns needs [G, {codes.shape[1]}] for both."
            )
        return int_weight((codes - mid).t(), (zeros - mid).t(), scales.t(), BITS, None, module)
