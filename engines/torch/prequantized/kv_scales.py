"""KV-cache scales a pre-quantized checkpoint carries, in kiln's convention: float32 [layers, 2 (k, v), kv_heads],
value = code * scale (engines/torch/attention.py KVLayer), one scale per KV head.

The producers store one dequantization scale per layer (value = code * scale, amax / 448 for an FP8 cache) under the
names vLLM's weight_utils.maybe_remap_kv_scale_name maps onto its attention layers:

- `self_attn.k_scale` / `v_scale`: llm-compressor's kv_cache_scheme (compressed-tensors) and quant_method "fp8"
- `self_attn.k_proj.k_scale` / `v_proj.v_scale`: NVIDIA ModelOpt's Hugging Face export
- `self_attn.k_proj.output_scale` / `v_proj.output_scale`: older compressed-tensors exports (vLLM's
  compressed_tensors get_cache_scale remaps them the same way)
- `self_attn.kv_scale`: AutoFP8's deprecated single scale, used for both

A scale of one element is the layer's for every KV head; [kv_heads] (compressed-tensors' attention-head strategy) is
taken as is. The scales are what the checkpoint's KV dtype means (FP8 unless its kv_cache_scheme says int); kiln's
other quantized KV dtype gets the same clipping range (amax) over its own code range.
"""

from __future__ import annotations

import torch

from engines.torch.checkpoint_tensors import CheckpointTensors

CODE_MAX = {"int8": 127.0, "fp8": 448.0}
# where each of k and v may be stored, relative to the layer's self_attn module
NAMES = {
    0: ("k_scale", "k_proj.k_scale", "k_proj.output_scale"),
    1: ("v_scale", "v_proj.v_scale", "v_proj.output_scale"),
}


def checkpoint_kv_dtype(quantization_config: dict) -> str:
    """The KV dtype the checkpoint's scales were computed for: int8 where compressed-tensors' kv_cache_scheme says
    integers, else FP8 (quant_method "fp8", ModelOpt, llm-compressor's FP8 KV)."""
    scheme = quantization_config.get("kv_cache_scheme") or {}
    return "int8" if scheme.get("type") == "int" else "fp8"


class KvScaleReader:
    """Takes each layer's KV scales out of the checkpoint as the layer's attention modules are read."""

    def __init__(self, num_layers: int, num_kv_heads: int):
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads
        self.found: dict[tuple[int, int], torch.Tensor] = {}  # (layer, 0 for k or 1 for v) -> [kv_heads]

    def take(self, ckpt: CheckpointTensors, module: str) -> None:
        """module: a checkpoint module under model.layers.{i}.self_attn; takes that layer's KV scales."""
        parts = module.split(".")
        if len(parts) < 4 or parts[:2] != ["model", "layers"] or parts[3] != "self_attn":
            return
        layer, attn = int(parts[2]), ".".join(parts[:4])
        if (single := ckpt.take_optional(f"{attn}.kv_scale")) is not None:
            self.found[(layer, 0)] = self.found[(layer, 1)] = self._per_head(single, f"{attn}.kv_scale")
        for kv, names in NAMES.items():
            for name in names:
                if (tensor := ckpt.take_optional(f"{attn}.{name}")) is not None:
                    self.found[(layer, kv)] = self._per_head(tensor, f"{attn}.{name}")
                    break

    def _per_head(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        if tensor.numel() == 1:
            return tensor.float().reshape(1).expand(self.num_kv_heads)
        if tensor.dim() == 1 and tensor.numel() == self.num_kv_heads:
            return tensor.float()
        raise ValueError(
            f"{name} has shape {list(tensor.shape)}; a KV-cache scale is one per layer ([] or [1]) or one per KV "
            f"head ([{self.num_kv_heads}])."
        )

    def scales(self) -> torch.Tensor | None:
        """[layers, 2, kv_heads] float32, None when the checkpoint has none; every layer's k and v or none."""
        if not self.found:
            return None
        missing = [
            f"layer {i} {'kv'[kv]}" for i in range(self.num_layers) for kv in (0, 1) if (i, kv) not in self.found
        ]
        if missing:
            raise ValueError(
                f"the checkpoint has KV-cache scales for some layers but none for {', '.join(missing[:4])}; kiln "
                "needs a k and a v scale for every layer."
            )
        return torch.stack(
            [torch.stack([self.found[(i, 0)], self.found[(i, 1)]]) for i in range(self.num_layers)]
        ).contiguous()


def convert_kv_scales(scales: torch.Tensor, stored_for: str, kv_cache_dtype: str) -> torch.Tensor:
    """The checkpoint's scales (computed for `stored_for`) for a kiln KV cache of `kv_cache_dtype`: the same clipping
    range (amax = scale * its code maximum) over the other dtype's codes."""
    if stored_for == kv_cache_dtype:
        return scales
    return scales * (CODE_MAX[stored_for] / CODE_MAX[kv_cache_dtype])
