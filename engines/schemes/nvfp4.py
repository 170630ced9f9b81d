"""nvfp4: NVIDIA's FP4 weights and activations, which only TensorRT-LLM builds (Blackwell, SM >= 100)."""

from __future__ import annotations

from typing import ClassVar

from engines.schemes.base import Scheme, TrtllmMapping


class Nvfp4(Scheme):
    name = "nvfp4"
    projection_format = "nvfp4"
    family = "nvfp4"
    bits_per_weight = 4.0
    torch_build = False
    trtllm: ClassVar[TrtllmMapping | None] = TrtllmMapping(quant_algo="NVFP4", min_sm=100, calibrated=True)
