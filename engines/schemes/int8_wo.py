"""int8-wo: round-to-nearest int8 weights per output channel, activations stay in the model dtype (W8A16)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from engines.schemes.base import LayerResult, QuantizeContext, Scheme, TrtllmMapping

if TYPE_CHECKING:
    from engines.build.quantize import LayerWeights


class Int8WeightOnly(Scheme):
    name = "int8-wo"
    projection_format = "int8"
    family = "int8"
    plan_row = True
    trtllm: ClassVar[TrtllmMapping | None] = TrtllmMapping(quant_algo="W8A16", min_sm=80)

    def quantize_layer(self, layer: LayerWeights, ctx: QuantizeContext) -> dict[str, LayerResult]:
        from engines.quant.rtn import quantize_rtn
        from engines.torch.layers import formats as fmt

        return {
            kind: LayerResult(fmt.encode_int8(layer.name(kind), quantize_rtn(w, 8), layer.bias(kind), ctx.store))
            for kind, w in layer.weights.items()
        }
