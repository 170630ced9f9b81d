"""fp32 and bf16: the float weights as they are (fp32 keeps float32 end to end, the build's reference)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from engines.schemes.base import LayerResult, QuantizeContext, Scheme, TrtllmMapping

if TYPE_CHECKING:
    from engines.build.quantize import LayerWeights


class _Dense(Scheme):
    projection_format = "dense"
    head_format = "dense"
    default_kv = "model"

    def quantize_layer(self, layer: LayerWeights, ctx: QuantizeContext) -> dict[str, LayerResult]:
        from engines.torch.layers import formats as fmt

        return {
            kind: LayerResult(fmt.encode_dense(layer.name(kind), w, layer.bias(kind), ctx.store))
            for kind, w in layer.weights.items()
        }


class Fp32(_Dense):
    name = "fp32"
    bits_per_weight = 32.0
    family = "fp32"
    runtime_dtype = "float32"


class Bf16(_Dense):
    name = "bf16"
    bits_per_weight = 16.0
    family = "bf16"
    plan_row = True
    # bf16 math needs Ampere in TensorRT-LLM; kiln's torch CUDA path runs it anywhere
    trtllm: ClassVar[TrtllmMapping | None] = TrtllmMapping(quant_algo=None, min_sm=80)
