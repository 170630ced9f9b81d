"""Qwen3 (dense): Llama with an RMSNorm on every query and key head (q_norm, k_norm: [head_dim] weights) between
the projection and RoPE, a head_dim of its own (not hidden / heads), and optional attention biases.

transformers' Qwen3Attention normalizes q and k with Qwen3RMSNorm, which rounds like LlamaRMSNorm, so kiln's
rms_norm kernel runs it on the [T * heads, head_dim] rows. The normalized q and k are written back into the
qkv projection's output, the one tensor both attention paths read: the fused path's rope_kv kernel rotates and
caches keys straight from it.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
from torch import nn

from engines.torch.kernels.rms_norm import rms_norm
from engines.torch.models import llama
from engines.torch.models.llama import LlamaArgs, LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def layer_norms(cls, args: LlamaArgs) -> dict[str, int]:
        return super().layer_norms(args) | {"q_norm": args.head_dim, "k_norm": args.head_dim}

    def qkv(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        a = self.args
        qkv = layer.qkv_proj(h)
        heads = qkv.view(qkv.shape[0], a.num_heads + 2 * a.num_kv_heads, a.head_dim)
        q, k = heads[:, : a.num_heads], heads[:, a.num_heads : a.num_heads + a.num_kv_heads]
        q.copy_(rms_norm(q, layer.q_norm, a.rms_norm_eps))
        k.copy_(rms_norm(k, layer.k_norm, a.rms_norm_eps))
        return qkv


QWEN3_NORMS = llama.LLAMA_NORMS | {"q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}


def param_count(args: LlamaArgs) -> int:
    return llama.param_count(args) + args.num_layers * 2 * args.head_dim  # q_norm, k_norm


# The norms in front of qkv and gate_up are Llama's, and v (o_proj's input) is not normalized, so Llama's folds
# hold unchanged: scaling qkv's input columns leaves its output, and so the q/k norms' inputs, as they were.
QWEN3 = dataclasses.replace(
    llama.LLAMA,
    model_type="qwen3",  # Llama's args: biases with attention_bias, Qwen2's sliding window (llama.layer_windows)
    model_class=Qwen3ForCausalLM,
    read_checkpoint=partial(llama.read_hf_checkpoint, norms=QWEN3_NORMS),
    assemble=partial(llama.assemble, model_class=Qwen3ForCausalLM),
    param_count=param_count,
)
