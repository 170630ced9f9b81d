"""Quantize a float model's projections into an engine's stored tensors.

Input: the float32 tensors under kiln's names (models/llama.py read_hf_checkpoint) and the
calibration statistics; output: the tensors of weights.safetensors plus the weight format of each
projection kind (layers/formats.py). What each precision does to a layer is its scheme's
quantize_layer (engines/schemes); this module walks the layers and owns the model's topology:

Smoothing/AWQ scales are folded exactly into the op producing each input: the RMSNorm weight for
qkv and gate/up, the `up` rows for down (down reads silu(gate) * up), and the `v` rows for o_proj
when every query head has its own KV head (with grouped-query attention one v channel feeds
several o_proj channels, so o_proj gets no scale, only AWQ's clip search).
The LM head is kept int8 in the integer precisions: on this CPU it is a fifth of the weight bytes
and int8 per-channel costs it little accuracy (the build report measures it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from engines import schemes
from engines.build.calibrate import CalibrationResult, Needs, ProjectionStats
from engines.schemes import QuantizeContext
from engines.torch.models.llama import PROJECTIONS, LlamaArgs


def needs_for(precision: str, kv_cache_dtype: str) -> Needs:
    """Which statistics the calibration pass must collect for this build."""
    wanted = schemes.get(precision).calibration
    return Needs(samples="samples" in wanted, hessian="hessian" in wanted, channel_amax="channel_amax" in wanted,
                 kv=kv_cache_dtype in ("int8", "fp8"))


@dataclass
class QuantizedModel:
    tensors: dict[str, torch.Tensor]
    formats: dict[str, str]  # projection kind (and "lm_head") -> stored format
    group_sizes: dict[str, int] = field(default_factory=dict)  # int4: projection kind -> group size used
    details: dict[str, object] = field(default_factory=dict)  # e.g. chosen AWQ alphas, SmoothQuant alpha


class LayerWeights:
    """One decoder layer's float32 projection weights (kind -> [N, K]) and the ops producing their inputs,
    which a scheme changes only through scale_input / divide_producer so that it needs no topology."""

    def __init__(self, t: dict[str, torch.Tensor], index: int, args: LlamaArgs):
        self.prefix = f"layers.{index}."
        self.args = args
        self._t = t
        self.weights = {kind: t[self.prefix + kind + ".weight"].float() for kind in PROJECTIONS}
        self.norms = {"qkv_proj": t[self.prefix + "input_norm.weight"].float(),
                      "gate_up_proj": t[self.prefix + "post_norm.weight"].float()}

    def name(self, kind: str) -> str:
        return self.prefix + kind

    def bias(self, kind: str) -> torch.Tensor | None:
        return self._t.get(self.prefix + kind + ".bias")

    def can_fold(self, kind: str) -> bool:
        """Whether a per-input-channel scale of `kind` can be folded into the op producing its input."""
        return kind != "o_proj" or self.args.num_heads == self.args.num_kv_heads  # MHA: o_proj channel j reads v j

    def divide_producer(self, kind: str, s: torch.Tensor) -> None:
        """Divide the op producing `kind`'s input by s [K], per channel."""
        if kind == "down_proj":  # down reads silu(gate) * up: scale the `up` rows
            gate_up = self.weights["gate_up_proj"]
            inter = gate_up.shape[0] // 2
            scaled = gate_up.clone()
            scaled[inter:] *= (1 / s)[:, None]
            self.weights["gate_up_proj"] = scaled
        elif kind == "o_proj":
            if not self.can_fold(kind):
                raise ValueError("o_proj's input has no per-channel producer under grouped-query attention")
            args = self.args
            qkv = self.weights["qkv_proj"].clone()
            qkv[(args.num_heads + args.num_kv_heads) * args.head_dim:] /= s[:, None]  # the v rows
            self.weights["qkv_proj"] = qkv
        else:
            self.norms[kind] = self.norms[kind] / s

    def scale_input(self, kind: str, s: torch.Tensor) -> None:
        """W[:, j] *= s_j and the producer /= s_j: the layer computes the same, its input range changes."""
        self.weights[kind] = self.weights[kind] * s
        self.divide_producer(kind, s)


def quantize_model(float_tensors: dict[str, torch.Tensor], args: LlamaArgs, precision: str,
                   calib: CalibrationResult | None, group_size: int = 128, progress: bool = True) -> QuantizedModel:
    """Quantize every projection of `float_tensors` (float32, kiln names; not modified)."""
    scheme = schemes.get(precision)
    store = scheme.store_dtype()
    out: dict[str, torch.Tensor] = {}
    t = float_tensors  # only read: the schemes fold scales into LayerWeights' copies
    q = QuantizedModel(out, {kind: scheme.projection_format for kind in PROJECTIONS} | {"lm_head": scheme.head_format})

    def stats(name: str) -> ProjectionStats:
        if calib is None:
            raise RuntimeError(f"{precision} needs calibration statistics")
        return calib.projections[name]

    ctx = QuantizeContext(stats, group_size, store)
    for i in tqdm(range(args.num_layers), desc=f"quantize {precision}", unit="layer", disable=not progress):
        layer = LayerWeights(t, i, args)
        projections = scheme.quantize_layer(layer, ctx)
        out[layer.prefix + "input_norm.weight"] = layer.norms["qkv_proj"].to(store)
        out[layer.prefix + "post_norm.weight"] = layer.norms["gate_up_proj"].to(store)
        for kind in PROJECTIONS:
            result = projections[kind]
            out.update(result.tensors)
            if result.group_size is not None:
                q.group_sizes[kind] = result.group_size

    out["embed_tokens.weight"] = t["embed_tokens.weight"].to(store)
    out["norm.weight"] = t["norm.weight"].to(store)
    head = t.get("lm_head.weight", t["embed_tokens.weight"])  # tied: the embeddings
    encoded_head = scheme.encode_head(head, store)
    if encoded_head is not None:
        out.update(encoded_head)
    elif "lm_head.weight" in t:
        out["lm_head.weight"] = head.to(store)
    q.details.update(scheme.details(ctx))
    return q
