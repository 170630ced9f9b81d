"""Quantize a float model's projections into an engine's stored tensors.

Input: the float32 tensors under kiln's names (the architecture's read_checkpoint) and the
calibration statistics; output: the tensors of weights.safetensors plus the weight format of each
projection kind (layers/formats.py). What each precision does to a layer is its scheme's
quantize_layer (engines/schemes); this module walks the layers and gives the schemes each layer's
inputs along the architecture's quantization topology (engines/torch/models/topology.py), so that
neither side knows the other's names.

Smoothing/AWQ scales are folded exactly into the op producing each input. For Llama: the RMSNorm
weight for qkv and gate/up, the `up` rows for down (down reads silu(gate) * up), and the `v` rows
for o_proj when every query head has its own KV head (with grouped-query attention one v channel
feeds several o_proj channels, so o_proj gets no scale, only AWQ's clip search).
The LM head is kept int8 in the integer precisions: on this CPU it is a fifth of the weight bytes
and int8 per-channel costs it little accuracy (the build report measures it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from engines import schemes
from engines.build.calibrate import Needs, ProjectionStats
from engines.schemes import QuantizeContext, Scheme
from engines.torch.models.architecture import Architecture
from engines.torch.models.protocol import ModelArgs
from engines.torch.models.registry import architecture
from engines.torch.models.topology import NormGroup, RowFold


def needs_for(precision: str, kv_cache_dtype: str) -> Needs:
    """Which statistics the calibration pass must collect for this build."""
    wanted = schemes.get(precision).calibration
    return Needs(
        samples="samples" in wanted,
        hessian="hessian" in wanted,
        channel_amax="channel_amax" in wanted,
        kv=kv_cache_dtype in ("int8", "fp8"),
    )


@dataclass
class QuantizedModel:
    tensors: dict[str, torch.Tensor]
    formats: dict[str, str]  # projection kind (and "lm_head") -> stored format
    group_sizes: dict[str, int] = field(default_factory=dict)  # int4: projection kind -> group size used
    details: dict[str, object] = field(default_factory=dict)  # e.g. chosen AWQ alphas, SmoothQuant alpha


@dataclass(frozen=True)
class LayerInput:
    """One input of a layer's projections: the projections reading it (they share any per-channel scale of
    it) and what produces it, if a scale can be folded into that exactly."""

    consumers: tuple[str, ...]
    producer: NormGroup | RowFold | None  # None: no exact fold (AWQ only searches the clip)
    smooth: bool  # SmoothQuant migrates this input's outliers

    @property
    def foldable(self) -> bool:
        return self.producer is not None


class LayerWeights:
    """One decoder layer's float32 projection weights (kind -> [N, K]) and the ops producing their inputs,
    which a scheme changes only through scale_input / divide_producer so that it needs no topology."""

    def __init__(self, t: dict[str, torch.Tensor], index: int, args: ModelArgs, arch: Architecture[Any]):
        self.prefix = f"layers.{index}."
        self.args = args
        self._t = t
        projections = arch.layer_projections(args)
        self.weights = {kind: t[self.prefix + kind + ".weight"].float() for kind in projections}
        self.biases = {kind: t.get(self.prefix + kind + ".bias") for kind in projections}
        self.norms = {g.norm: t[self.prefix + g.norm + ".weight"].float() for g in arch.topology_for(args).norm_groups}
        self.inputs = _inputs(arch, args)

    def name(self, kind: str) -> str:
        return self.prefix + kind

    def bias(self, kind: str) -> torch.Tensor | None:
        return self.biases[kind]

    def divide_producer(self, inp: LayerInput, s: torch.Tensor) -> None:
        """Divide the op producing `inp` by s [K], per channel (once, however many projections read it)."""
        producer = inp.producer
        if isinstance(producer, NormGroup):
            self.norms[producer.norm] = self.norms[producer.norm] / s
        elif isinstance(producer, RowFold) and (rows := producer.rows(self.args)) is not None:
            kind = producer.producer
            self.weights[kind] = _divide_rows(self.weights[kind], rows, s[:, None], producer.reciprocal)
            bias = self.biases[kind]
            if bias is not None:  # a row's output is W_row x + b_row: both scale (Qwen2's and Qwen3's v bias)
                self.biases[kind] = _divide_rows(bias.float(), rows, s, producer.reciprocal).to(bias.dtype)
        else:
            raise ValueError(f"the input of {', '.join(inp.consumers)} has no per-channel producer to fold into")

    def scale_input(self, inp: LayerInput, s: torch.Tensor) -> None:
        """W[:, j] *= s_j for every consumer and the producer /= s_j: the layer computes the same, its input
        range changes."""
        for kind in inp.consumers:
            self.weights[kind] = self.weights[kind] * s
        self.divide_producer(inp, s)


def _divide_rows(t: torch.Tensor, rows: slice, s: torch.Tensor, reciprocal: bool) -> torch.Tensor:
    out = t.clone()
    if reciprocal:
        out[rows] *= 1 / s
    else:
        out[rows] /= s
    return out


def _inputs(arch: Architecture[Any], args: ModelArgs) -> tuple[LayerInput, ...]:
    """Every projection's input, each projection in exactly one, consumers before producers: a row fold
    changes its producer's weight, which must happen before that producer is scaled or quantized itself.
    The topology's unfolded projections come last, without a producer."""
    topology = arch.topology_for(args)
    named = topology.named()
    if sorted(named) != sorted(arch.layer_projections(args)):
        raise ValueError(
            f"The {args.model_type} quantization topology places {sorted(named)}, not each of its projections "
            f"{sorted(arch.layer_projections(args))} once."
        )
    inputs = [
        LayerInput((f.consumer,), f if f.rows(args) is not None else None, f.smooth and f.rows(args) is not None)
        for f in topology.row_folds
    ]
    inputs += [LayerInput(g.consumers, g, True) for g in topology.norm_groups]
    inputs += [LayerInput((kind,), None, False) for kind in topology.unfolded]
    return tuple(inputs)


def quantize_model(
    float_tensors: dict[str, torch.Tensor],
    args: ModelArgs,
    precision: str,
    stats: Mapping[str, ProjectionStats] | None,
    group_size: int = 128,
    progress: bool = True,
) -> QuantizedModel:
    """Quantize every projection of `float_tensors` (float32, kiln names; not modified) of the model `args`
    describe, with the calibration statistics of each projection by full name ("layers.3.down_proj"); scales fold
    along its architecture's topology. (The build quantizes a layer at a time: quantize_layer, quantize_outer.)"""
    scheme = schemes.get(precision)
    q = QuantizedModel({}, model_formats(args, scheme))

    def lookup(name: str) -> ProjectionStats:
        if stats is None:
            raise RuntimeError(f"{precision} needs calibration statistics")
        return stats[name]

    ctx = QuantizeContext(lookup, group_size, scheme.store_dtype())
    for i in tqdm(range(args.num_layers), desc=f"quantize {precision}", unit="layer", disable=not progress):
        layer = {name: t for name, t in float_tensors.items() if name.startswith(f"layers.{i}.")}
        q.tensors.update(quantize_layer(layer, i, args, scheme, ctx, q.group_sizes))
    outer = {name: t for name, t in float_tensors.items() if not name.startswith("layers.")}
    q.tensors.update(quantize_outer(outer, scheme))
    q.details.update(scheme.details(ctx))
    return q


def model_formats(args: ModelArgs, scheme: Scheme) -> dict[str, str]:
    """The stored format of each projection kind and of the LM head (the manifest's weight_formats)."""
    arch = architecture(args.model_type)
    return {kind: scheme.projection_format for kind in arch.layer_projections(args)} | {"lm_head": scheme.head_format}


def quantize_layer(
    float_tensors: dict[str, torch.Tensor],
    index: int,
    args: ModelArgs,
    scheme: Scheme,
    ctx: QuantizeContext,
    group_sizes: dict[str, int],
) -> dict[str, torch.Tensor]:
    """Decoder layer `index`: its float32 tensors (kiln names; not modified) -> its stored tensors. ctx.stats
    answers for this layer's projections; the int4 group size of each projection kind goes into group_sizes."""
    arch = architecture(args.model_type)
    layer = LayerWeights(float_tensors, index, args, arch)
    projections = scheme.quantize_layer(layer, ctx)
    out: dict[str, torch.Tensor] = {}
    consumed = set()
    for norm, weight in layer.norms.items():
        out[layer.prefix + norm + ".weight"] = weight.to(ctx.store)
    for kind in arch.layer_projections(args):
        result = projections[kind]
        out.update(result.tensors)
        consumed.update((layer.name(kind) + ".weight", layer.name(kind) + ".bias"))
        if result.group_size is not None:
            group_sizes[kind] = result.group_size
    for name, tensor in float_tensors.items():  # whatever else the architecture keeps in a layer, as is
        if name not in consumed and name not in out:
            out[name] = tensor.to(ctx.store)
    return out


def quantize_outer(float_tensors: dict[str, torch.Tensor], scheme: Scheme) -> dict[str, torch.Tensor]:
    """The tensors outside the decoder layers (embeddings, final norm, LM head) -> their stored tensors: the head
    in the scheme's head format, the rest as is."""
    store = scheme.store_dtype()
    out = {name: t.to(store) for name, t in float_tensors.items() if name != "lm_head.weight"}
    head = float_tensors.get("lm_head.weight", float_tensors["embed_tokens.weight"])  # tied: the embeddings
    encoded_head = scheme.encode_head(head, store)
    if encoded_head is not None:
        out.update(encoded_head)
    elif "lm_head.weight" in float_tensors:
        out["lm_head.weight"] = head.to(store)
    return out
