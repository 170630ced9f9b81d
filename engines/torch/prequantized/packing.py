"""Integer codes packed into int32 words, lowest bits first: element j of a word sits at bits [j * bits, (j + 1) *
bits). GPTQ (AutoGPTQ's QuantLinear.pack), AWQ (AutoAWQ's WQLinear_GEMM.from_linear, before its column
interleave) and compressed-tensors (pack_to_int32, for 4 and 8 bits, where no code straddles two words) all pack
this way; they differ in the dimension packed and in the order and offset of the codes."""

from __future__ import annotations

import torch


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 [R, C] -> int32 codes in [0, 2**bits): [R * 32 / bits, C] (dim 0) or [R, C * 32 / bits] (dim 1)."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    mask = (1 << bits) - 1
    if dim == 0:
        codes = (packed.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask  # [R, per_word, C]
        return codes.reshape(packed.shape[0] * per_word, packed.shape[1])
    codes = (packed.unsqueeze(2) >> shifts.view(1, 1, -1)) & mask  # [R, C, per_word]
    return codes.reshape(packed.shape[0], packed.shape[1] * per_word)
