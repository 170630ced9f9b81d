"""Quantize a float model's projections into an engine's stored tensors, one precision at a time.

Input: the float32 tensors under kiln's names (models/llama.py read_hf_checkpoint) and the
calibration statistics; output: the tensors of weights.safetensors plus the weight format of each
projection kind (layers/formats.py). What each precision does:

| precision | projections                                   | LM head     | calibration used           |
|-----------|-----------------------------------------------|-------------|----------------------------|
| fp32/bf16 | dense                                         | dense       | -                          |
| int8-wo   | RTN int8 per channel (W8A16)                  | int8        | -                          |
| int8-sq   | SmoothQuant (alpha) then int8 W8A8            | int8        | per-channel input max |x|  |
| fp8       | E4M3 per channel (activations dynamic)        | dense       | -                          |
| int4-rtn  | RTN int4 asymmetric, group-wise (W4A16)       | int8        | -                          |
| int4-awq  | AWQ scale + clip search, int4 group-wise      | int8        | input-row samples          |
| int4-gptq | GPTQ (Hessian, 1% damping, 128-col blocks)    | int8        | Hessians                   |

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

from engines.build.calibrate import CalibrationResult, Needs
from engines.quant.awq import awq_quantize, search_clip
from engines.quant.fp8 import quantize_fp8
from engines.quant.gptq import gptq_quantize
from engines.quant.rtn import quantize_rtn
from engines.quant.smoothquant import apply_smoothing, quantize_w8a8, smooth_scales
from engines.quant.types import QuantizedWeight
from engines.torch.layers import formats as fmt
from engines.torch.models.llama import PROJECTIONS, LlamaArgs

PROJECTION_FORMAT = {"fp32": "dense", "bf16": "dense", "int8-wo": "int8", "int8-sq": "w8a8", "fp8": "fp8",
                     "int4-rtn": "int4", "int4-awq": "int4", "int4-gptq": "int4"}
MIN_GROUP_SIZE = 32


def needs_for(precision: str, kv_cache_dtype: str) -> Needs:
    """Which statistics the calibration pass must collect for this build."""
    return Needs(samples=precision == "int4-awq", hessian=precision == "int4-gptq",
                 channel_amax=precision == "int8-sq", kv=kv_cache_dtype in ("int8", "fp8"))


def effective_group_size(k: int, group_size: int) -> int:
    """group_size if it divides K, else the largest halving of it (down to 32) that does: SmolLM2's
    hidden size 576 is not a multiple of 128, so its K=576 projections get groups of 64."""
    g = group_size
    while g >= MIN_GROUP_SIZE:
        if k % g == 0:
            return g
        g //= 2
    raise ValueError(f"No group size between {MIN_GROUP_SIZE} and {group_size} divides the input size {k}; "
                     "pick another --group-size.")


@dataclass
class QuantizedModel:
    tensors: dict[str, torch.Tensor]
    formats: dict[str, str]  # projection kind (and "lm_head") -> stored format
    group_sizes: dict[str, int] = field(default_factory=dict)  # int4: projection kind -> group size used
    details: dict[str, object] = field(default_factory=dict)  # e.g. chosen AWQ alphas, SmoothQuant alpha


def quantize_model(float_tensors: dict[str, torch.Tensor], args: LlamaArgs, precision: str,
                   calib: CalibrationResult | None, group_size: int = 128, smooth_alpha: float = 0.5,
                   progress: bool = True) -> QuantizedModel:
    """Quantize every projection of `float_tensors` (float32, kiln names; not modified)."""
    store = torch.float32 if precision == "fp32" else torch.bfloat16
    proj_fmt = PROJECTION_FORMAT[precision]
    head_fmt = "dense" if proj_fmt in ("dense", "fp8") else "int8"
    out: dict[str, torch.Tensor] = {}
    t = dict(float_tensors)  # shallow: folding replaces entries, never edits a tensor in place
    q = QuantizedModel(out, {kind: proj_fmt for kind in PROJECTIONS} | {"lm_head": head_fmt})
    alphas: list[float] = []
    q_size = args.num_heads * args.head_dim
    mha = args.num_heads == args.num_kv_heads

    def stats(name: str):
        if calib is None:
            raise RuntimeError(f"{precision} needs calibration statistics")
        return calib.projections[name]

    for i in tqdm(range(args.num_layers), desc=f"quantize {precision}", unit="layer", disable=not progress):
        p = f"layers.{i}."
        w = {kind: t[p + kind + ".weight"].float() for kind in PROJECTIONS}
        norms = {"qkv_proj": t[p + "input_norm.weight"].float(), "gate_up_proj": t[p + "post_norm.weight"].float()}
        qws: dict[str, QuantizedWeight] = {}
        if precision == "int8-sq":
            # down first: its scale is folded into the `up` rows of gate_up before those are quantized
            s = smooth_scales(stats(p + "down_proj").observer.amax, w["down_proj"], smooth_alpha)
            w["down_proj"] = w["down_proj"] * s
            w["gate_up_proj"] = _scale_up_rows(w["gate_up_proj"], 1 / s)
            for kind in ("qkv_proj", "gate_up_proj"):
                s = smooth_scales(stats(p + kind).observer.amax, w[kind], smooth_alpha)
                norms[kind], w[kind] = apply_smoothing(norms[kind], w[kind], s)
            for kind in PROJECTIONS:
                qweight, scales = quantize_w8a8(w[kind])
                qws[kind] = QuantizedWeight(qweight, scales.reshape(-1, 1), None, 8, None, True)
        elif precision == "int4-awq":
            for kind in ("down_proj", "o_proj", "qkv_proj", "gate_up_proj"):  # down before gate_up (folding)
                g = effective_group_size(w[kind].shape[1], group_size)
                x = stats(p + kind).sample_matrix()
                if kind == "o_proj" and not mha:
                    ratio = search_clip(x, w[kind], 4, g, False)
                    qws[kind] = quantize_rtn(w[kind], 4, g, False, clip_ratio=ratio)
                    continue
                res = awq_quantize(x, w[kind], bits=4, group_size=g, symmetric=False)
                qws[kind] = res.qweights[0]
                alphas.append(res.alpha)
                if kind == "down_proj":
                    w["gate_up_proj"] = _scale_up_rows(w["gate_up_proj"], 1 / res.scales)
                elif kind == "o_proj":  # MHA: o_proj channel j reads v channel j
                    qkv = w["qkv_proj"].clone()
                    qkv[q_size + args.num_kv_heads * args.head_dim:] /= res.scales[:, None]
                    w["qkv_proj"] = qkv
                else:
                    norms[kind] = norms[kind] / res.scales
        elif precision == "int4-gptq":
            for kind in PROJECTIONS:
                g = effective_group_size(w[kind].shape[1], group_size)
                qws[kind] = gptq_quantize(w[kind], h=stats(p + kind).hessian_mean(), bits=4, group_size=g,
                                          symmetric=False)
        elif precision == "int4-rtn":
            for kind in PROJECTIONS:
                qws[kind] = quantize_rtn(w[kind], 4, effective_group_size(w[kind].shape[1], group_size), False)
        elif precision == "int8-wo":
            for kind in PROJECTIONS:
                qws[kind] = quantize_rtn(w[kind], 8)

        out[p + "input_norm.weight"] = norms["qkv_proj"].to(store)
        out[p + "post_norm.weight"] = norms["gate_up_proj"].to(store)
        for kind in PROJECTIONS:
            prefix, bias = p + kind, t.get(p + kind + ".bias")
            if proj_fmt == "dense":
                out.update(fmt.encode_dense(prefix, w[kind], bias, store))
            elif proj_fmt == "fp8":
                out.update(fmt.encode_fp8(prefix, *quantize_fp8(w[kind], per_channel=True), bias, store))
            elif proj_fmt == "int4":
                out.update(fmt.encode_int4(prefix, qws[kind], bias, store))
                q.group_sizes[kind] = qws[kind].group_size
            else:  # int8 and w8a8 store the same tensors
                out.update(fmt.encode_int8(prefix, qws[kind], bias, store))

    out["embed_tokens.weight"] = t["embed_tokens.weight"].to(store)
    out["norm.weight"] = t["norm.weight"].to(store)
    head = t.get("lm_head.weight", t["embed_tokens.weight"])  # tied: the embeddings
    if head_fmt == "int8":
        out.update(fmt.encode_int8("lm_head", quantize_rtn(head.float(), 8), None, store))
    elif "lm_head.weight" in t:
        out["lm_head.weight"] = head.to(store)
    if alphas:
        q.details["awq_alpha_mean"] = round(sum(alphas) / len(alphas), 3)
    if precision == "int8-sq":
        q.details["smoothquant_alpha"] = smooth_alpha
    return q


def _scale_up_rows(gate_up: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Multiply the `up` half of a fused [2 * I, K] gate/up weight by factor [I] per row."""
    inter = gate_up.shape[0] // 2
    out = gate_up.clone()
    out[inter:] *= factor[:, None]
    return out
