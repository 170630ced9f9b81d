"""OLMo 2: Llama's projections with its norms moved. No norm in front of a sublayer: attention and the MLP read
the residual stream itself, and RMSNorms on their outputs (post_attention_layernorm, post_feedforward_layernorm)
come before each residual add. q_norm and k_norm normalize the whole q and k projections (one RMS over all
heads, [heads * head_dim] and [kv_heads * head_dim] weights) before RoPE.

Olmo2RMSNorm multiplies by the weight in float32 and rounds once (LlamaRMSNorm rounds x * r to the model dtype
first). In float32 the two are one formula, and kiln's rms_norm kernel runs it; in other dtypes plain torch ops
give transformers' rounding.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
from torch import nn

from engines.torch.kernels.rms_norm import rms_norm
from engines.torch.models import llama
from engines.torch.models.llama import LlamaArgs, LlamaForCausalLM
from engines.torch.models.topology import QuantTopology, RowFold


def olmo2_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return rms_norm(x, weight, eps)
    xf = x.float()
    return (weight.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


class Olmo2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def layer_norms(cls, args: LlamaArgs) -> dict[str, int]:
        return {
            "attention_out_norm": args.hidden_size,
            "mlp_out_norm": args.hidden_size,
            "q_norm": args.num_heads * args.head_dim,
            "k_norm": args.num_kv_heads * args.head_dim,
        }

    def layer_input(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x

    def qkv(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        eps = self.args.rms_norm_eps
        qkv = layer.qkv_proj(h)
        q, k = qkv[:, : layer.q_size], qkv[:, layer.q_size : layer.q_size + layer.kv_size]
        q.copy_(olmo2_rms_norm(q, layer.q_norm, eps))  # written back: the fused path reads qkv as one tensor
        k.copy_(olmo2_rms_norm(k, layer.k_norm, eps))
        return qkv

    def after_attention(
        self, layer: nn.Module, x: torch.Tensor, out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + olmo2_rms_norm(out, layer.attention_out_norm, self.args.rms_norm_eps)
        return x, x

    def after_mlp(
        self, layer: nn.Module, x: torch.Tensor, out: torch.Tensor, next_layer: nn.Module | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        eps = self.args.rms_norm_eps
        x = x + olmo2_rms_norm(out, layer.mlp_out_norm, eps)
        return x, (x if next_layer is not None else olmo2_rms_norm(x, self.norm, eps))


OLMO2_NORMS = {
    "attention_out_norm": "post_attention_layernorm",
    "mlp_out_norm": "post_feedforward_layernorm",
    "q_norm": "self_attn.q_norm",
    "k_norm": "self_attn.k_norm",
}


def param_count(args: LlamaArgs) -> int:
    # Llama's count has two [hidden] norms per layer, as OLMo 2 has; add the q and k norms
    return llama.param_count(args) + args.num_layers * (args.num_heads + args.num_kv_heads) * args.head_dim


# No norm feeds a projection: qkv and gate_up read the residual stream, and a per-channel scale cannot fold into
# it exactly (every later sublayer reads the stream, and the post-norms after each add are not per-channel
# linear). The folds into producer rows hold as for Llama: v is not normalized (only q and k are) and down_proj
# reads silu(gate) * up.
TOPOLOGY = QuantTopology(
    norm_groups=(),
    row_folds=(
        RowFold("down_proj", "gate_up_proj", llama.up_rows, reciprocal=True),
        RowFold("o_proj", "qkv_proj", llama.v_rows, smooth=False),
    ),
    unfolded=("qkv_proj", "gate_up_proj"),
)


OLMO2 = dataclasses.replace(
    llama.LLAMA,
    model_type="olmo2",
    model_class=Olmo2ForCausalLM,
    read_checkpoint=partial(llama.read_hf_checkpoint, norms=OLMO2_NORMS),
    assemble=partial(llama.assemble, model_class=Olmo2ForCausalLM),
    topology=TOPOLOGY,
    param_count=param_count,
)
