"""fp8: E4M3 weights with one scale per output channel, activations quantized dynamically (W8A8 FP8).
The LM head stays dense."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from engines.schemes.base import LayerResult, QuantizeContext, Scheme, TrtllmMapping

if TYPE_CHECKING:
    from engines.build.quantize import LayerWeights


class Fp8(Scheme):
    name = "fp8"
    projection_format = "fp8"
    head_format = "dense"
    default_kv = "fp8"
    family = "fp8"
    plan_row = True
    min_sm = 89  # FP8 tensor cores: Ada and Hopper
    sm_reason = "FP8 tensor cores"
    trtllm: ClassVar[TrtllmMapping | None] = TrtllmMapping(quant_algo="FP8", min_sm=89, calibrated=True)

    def quantize_layer(self, layer: LayerWeights, ctx: QuantizeContext) -> dict[str, LayerResult]:
        from engines.quant.fp8 import quantize_fp8
        from engines.torch.layers import formats as fmt

        return {
            kind: LayerResult(
                fmt.encode_fp8(layer.name(kind), *quantize_fp8(w, per_channel=True), layer.bias(kind), ctx.store)
            )
            for kind, w in layer.weights.items()
        }
