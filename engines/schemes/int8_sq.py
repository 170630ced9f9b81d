"""int8-sq: SmoothQuant, then int8 weights and per-token int8 activations (W8A8).

Per input channel j, s_j = max|X_j|^ALPHA / max|W_j|^(1-ALPHA) (engines/quant/smoothquant.py): each
smoothed projection's weight is multiplied by s along K and the op producing its input divided by s, so
X W^T is unchanged in exact arithmetic while X/s has a flatter range that per-token int8 represents well.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from engines.schemes.base import LayerResult, QuantizeContext, Scheme, TrtllmMapping

if TYPE_CHECKING:
    import torch

    from engines.build.quantize import LayerWeights

# SmoothQuant's migration strength of kiln's torch build.
ALPHA = 0.5


class Int8SmoothQuant(Scheme):
    name = "int8-sq"
    projection_format = "w8a8"
    family = "int8"
    calibration = frozenset({"channel_amax"})
    min_sm = 80  # INT8 tensor cores: Ampere
    sm_reason = "INT8 tensor cores"
    # No smoothquant_val: TensorRT-LLM 1.0 builds W8A8_SQ_PER_CHANNEL through ModelOpt, and PretrainedModel.quantize
    # (models/modeling_utils.py) does not pass QuantConfig.smoothquant_val to quantize_and_export, which smooths with
    # ModelOpt's INT8_SMOOTHQUANT_CFG and its default alpha (1.0; 0.5 only for Gemma). Only the legacy converter's
    # W8A8_SQ_*_PLUGIN algorithms read smoothquant_val.
    trtllm: ClassVar[TrtllmMapping | None] = TrtllmMapping(quant_algo="W8A8_SQ_PER_CHANNEL", min_sm=80, calibrated=True)

    def quantize_layer(self, layer: LayerWeights, ctx: QuantizeContext) -> dict[str, LayerResult]:
        from engines.quant.smoothquant import quantize_w8a8, smooth_scales
        from engines.quant.types import QuantizedWeight
        from engines.torch.layers import formats as fmt

        # layer.inputs lists consumers before producers, so a scale folded into a projection's rows is in place
        # before that projection is smoothed itself; the architecture's topology says which inputs are smoothed
        for inp in (inp for inp in layer.inputs if inp.smooth):
            if not ctx.calibrated(layer.name(inp.consumers[0])):
                continue  # left unsmoothed: no activation statistics to balance against
            ws = [layer.weights[kind] for kind in inp.consumers]
            layer.scale_input(inp, smooth_scales(_channel_amax(ctx, layer.name(inp.consumers[0])), ws, ALPHA))
        out: dict[str, LayerResult] = {}
        for kind, w in layer.weights.items():
            qweight, scales = quantize_w8a8(w)
            qw = QuantizedWeight(qweight, scales.reshape(-1, 1), None, 8, None, True)
            out[kind] = LayerResult(fmt.encode_int8(layer.name(kind), qw, layer.bias(kind), ctx.store))
        return out

    def details(self, ctx: QuantizeContext) -> dict[str, object]:
        return {"smoothquant_alpha": ALPHA} | ctx.uncalibrated_details()


def _channel_amax(ctx: QuantizeContext, name: str) -> torch.Tensor:
    observer = ctx.stats(name).observer
    if observer is None:
        raise RuntimeError(f"{name}: the calibration pass collected no per-channel input max")
    return observer.amax
