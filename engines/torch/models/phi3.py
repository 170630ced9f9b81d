"""Phi-3 and Phi-4-mini (model_type phi3): Llama's decoder with the checkpoint's q/k/v and gate/up already fused
(self_attn.qkv_proj is [q; k; v] rows and mlp.gate_up_proj [gate; up], kiln's own layouts, kept as they are),
LongRoPE, and RoPE on the first partial_rotary_factor of each head (Phi-4-mini: 0.75).

LongRoPE: transformers rotates with the short factors while a sequence is within original_max_position_embeddings
and, past it, recomputes the whole sequence with the long factors (Phi3ForCausalLM drops its cache). A paged cache
keeps the keys it rotated, so kiln serves such a model within original_max_position_embeddings only, where it is
exact (short factors and the attention factor transformers applies to both): the model's context limit is that.

Partial RoPE: the rope_kv kernel rotates whole heads, so such a model takes the torch path (fused_rope False), which
rotates the first rotary_dim channels of each head and passes the rest through, as apply_rotary_pos_emb does.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import torch
from torch import nn

from engines.torch.models import llama
from engines.torch.models.llama import LlamaArgs, LlamaForCausalLM, _rotate


def _rope_config(config: Any) -> dict[str, Any]:
    return getattr(config, "rope_parameters", None) or {}


def phi3_args(config: Any) -> LlamaArgs:
    args = LlamaArgs.from_hf_config(config)
    rope = _rope_config(config)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "longrope"):
        raise ValueError(f"Rope type {rope_type!r} is not supported for phi3 (default or longrope).")
    limit = args.max_position_embeddings
    if rope_type == "longrope":
        # the long factors apply only past original_max_position_embeddings, to the whole sequence (module docstring)
        original = rope.get("original_max_position_embeddings") or config.original_max_position_embeddings
        limit = min(limit, original)
    else:  # transformers' Phi3RotaryEmbedding default: over the rotated part of the head only
        dim = int(args.head_dim * rope.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        args = dataclasses.replace(args, inv_freq=inv_freq, rope_scaling=1.0)
    return dataclasses.replace(args, max_position_embeddings=limit)


class Phi3ForCausalLM(LlamaForCausalLM):
    def __init__(self, args: LlamaArgs):
        super().__init__(args)
        self.rotary_dim = 2 * args.inv_freq.shape[0]
        self.fused_rope = self.rotary_dim == args.head_dim  # rope_kv rotates whole heads only

    def rotated_qkv(
        self, layer: nn.Module, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.rotary_dim == self.args.head_dim:
            return super().rotated_qkv(layer, qkv, cos, sin)
        a, t, rd = self.args, qkv.shape[0], self.rotary_dim
        qk = qkv[:, : layer.q_size + layer.kv_size].view(t, a.num_heads + a.num_kv_heads, a.head_dim)
        qk = torch.cat((_rotate(qk[..., :rd], cos, sin), qk[..., rd:]), dim=-1)
        v = qkv[:, layer.q_size + layer.kv_size :].view(t, a.num_kv_heads, a.head_dim)
        return qk[:, : a.num_heads], qk[:, a.num_heads :], v


# the checkpoint's fused modules are kiln's projections as they are
PHI3_PROJECTIONS = {
    "qkv_proj": ("self_attn.qkv_proj",),
    "o_proj": ("self_attn.o_proj",),
    "gate_up_proj": ("mlp.gate_up_proj",),
    "down_proj": ("mlp.down_proj",),
}


def assemble(args: LlamaArgs, tensors, formats, dtype, device, layers: bool = True) -> LlamaForCausalLM:
    return llama.assemble(args, tensors, formats, dtype, device, model_class=Phi3ForCausalLM, layers=layers)


# Llama's norms, projections and layouts: its topology and parameter count hold unchanged.
PHI3 = dataclasses.replace(
    llama.LLAMA,
    model_type="phi3",
    args_from_config=phi3_args,
    model_class=Phi3ForCausalLM,
    read_checkpoint=partial(llama.read_hf_checkpoint, projections=PHI3_PROJECTIONS),
    assemble=assemble,
)
