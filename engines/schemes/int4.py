"""The int4 weight-only schemes (W4A16, asymmetric, group-wise scales and zero points); they store the
same format and differ in how they choose the codes:

- int4-rtn: round to nearest.
- int4-awq: AWQ's per-channel scale and clip search on input-row samples; the scale is folded into the op
  producing each projection's input (a projection without one gets only the clip search).
- int4-gptq: GPTQ (Hessian-guided rounding, 1% damping, 128-column blocks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from engines.schemes.base import LayerResult, QuantizeContext, Scheme, TrtllmMapping

if TYPE_CHECKING:
    from engines.build.quantize import LayerWeights
    from engines.quant.types import QuantizedWeight

MIN_GROUP_SIZE = 32


def effective_group_size(k: int, group_size: int) -> int:
    """group_size if it divides K, else the largest halving of it (down to 32) that does: SmolLM2's
    hidden size 576 is not a multiple of 128, so its K=576 projections get groups of 64."""
    g = group_size
    while g >= MIN_GROUP_SIZE:
        if k % g == 0:
            return g
        g //= 2
    raise ValueError(
        f"No group size between {MIN_GROUP_SIZE} and {group_size} divides the input size {k}; "
        "pick another --group-size."
    )


class _Int4(Scheme):
    projection_format = "int4"
    family = "int4"
    bits_per_weight = 4.0
    grouped = True
    min_sm = 80  # kiln's CUDA int4 kernels follow TensorRT-LLM's support matrix: Ampere

    def quantize_layer(self, layer: LayerWeights, ctx: QuantizeContext) -> dict[str, LayerResult]:
        from engines.torch.layers import formats as fmt

        qws = self.quantize_weights(layer, ctx)
        return {
            kind: LayerResult(
                fmt.encode_int4(layer.name(kind), qws[kind], layer.bias(kind), ctx.store), qws[kind].group_size
            )
            for kind in layer.weights
        }

    def quantize_weights(self, layer: LayerWeights, ctx: QuantizeContext) -> dict[str, QuantizedWeight]:
        raise NotImplementedError


class Int4Rtn(_Int4):
    name = "int4-rtn"
    # TensorRT-LLM's W4A16 has one scale per output channel (from_hugging_face quantizes with
    # symmetric_quantize_last_axis_of_batched_matrix; QuantConfig.group_size is not read), so no group size: the
    # trtllm build refuses a --group-size other than the default for it
    trtllm: ClassVar[TrtllmMapping | None] = TrtllmMapping(quant_algo="W4A16", min_sm=80)

    def quantize_weights(self, layer: LayerWeights, ctx: QuantizeContext) -> dict[str, QuantizedWeight]:
        from engines.quant.rtn import quantize_rtn

        return {
            kind: quantize_rtn(w, 4, effective_group_size(w.shape[1], ctx.group_size), False)
            for kind, w in layer.weights.items()
        }


class Int4Awq(_Int4):
    name = "int4-awq"
    calibration = frozenset({"samples"})
    plan_row = True
    trtllm: ClassVar[TrtllmMapping | None] = TrtllmMapping(
        quant_algo="W4A16_AWQ", min_sm=80, calibrated=True, grouped=True
    )

    def quantize_weights(self, layer: LayerWeights, ctx: QuantizeContext) -> dict[str, QuantizedWeight]:
        from engines.quant.awq import awq_quantize, search_clip
        from engines.quant.rtn import quantize_rtn

        qws: dict[str, QuantizedWeight] = {}
        for inp in layer.inputs:  # consumers before producers: a fold changes its producer's weight
            ws = [layer.weights[kind] for kind in inp.consumers]
            g = effective_group_size(ws[0].shape[1], ctx.group_size)
            if not ctx.calibrated(layer.name(inp.consumers[0])):
                qws.update((kind, quantize_rtn(w, 4, g, False)) for kind, w in zip(inp.consumers, ws))
                continue
            x = ctx.stats(layer.name(inp.consumers[0])).sample_matrix()  # every consumer reads the same x
            if not inp.foldable:
                for kind, w in zip(inp.consumers, ws):
                    qws[kind] = quantize_rtn(w, 4, g, False, clip_ratio=search_clip(x, w, 4, g, False))
                continue
            res = awq_quantize(x, ws, bits=4, group_size=g, symmetric=False)  # one scale for all consumers
            qws.update(zip(inp.consumers, res.qweights))
            ctx.collect("awq_alpha", res.alpha)
            layer.divide_producer(inp, res.scales)  # the weights themselves were scaled inside awq_quantize
        return qws

    def details(self, ctx: QuantizeContext) -> dict[str, object]:
        alphas = ctx.collected.get("awq_alpha")
        return ({"awq_alpha_mean": round(sum(alphas) / len(alphas), 3)} if alphas else {}) | ctx.uncalibrated_details()


class Int4Gptq(_Int4):
    name = "int4-gptq"
    calibration = frozenset({"hessian"})
    trtllm: ClassVar[TrtllmMapping | None] = TrtllmMapping(
        quant_algo="W4A16_GPTQ", min_sm=80, calibrated=True, grouped=True
    )

    def quantize_weights(self, layer: LayerWeights, ctx: QuantizeContext) -> dict[str, QuantizedWeight]:
        from engines.quant.gptq import gptq_quantize
        from engines.quant.rtn import quantize_rtn

        out: dict[str, QuantizedWeight] = {}
        for kind, w in layer.weights.items():
            g = effective_group_size(w.shape[1], ctx.group_size)
            if ctx.calibrated(layer.name(kind)):
                out[kind] = gptq_quantize(
                    w, h=ctx.stats(layer.name(kind)).hessian_mean(), bits=4, group_size=g, symmetric=False
                )
            else:
                out[kind] = quantize_rtn(w, 4, g, False)
        return out

    def details(self, ctx: QuantizeContext) -> dict[str, object]:
        return ctx.uncalibrated_details()
