"""Gemma 2 and Gemma 3 (text): Llama's projections with
- embeddings scaled by sqrt(hidden) (rounded to the model dtype first, as transformers does), tied LM head;
- RMSNorms of the (1 + weight) form, four per layer: before and after attention, before and after the MLP (the
  outputs are normalized before each residual add);
- a GeGLU MLP (gelu with the tanh approximation on the gate);
- attention scaled by query_pre_attn_scalar ** -0.5, sliding-window layers (config.layer_types) alternating with
  global ones; Gemma 2 soft-caps the attention scores (attn_logit_softcapping) and the final logits
  (final_logit_softcapping);
- Gemma 3 only: per-head q/k norms (the (1 + weight) form) before RoPE, and its own RoPE theta for the sliding
  layers (rope_parameters["sliding_attention"], the former rope_local_base_freq).

The checkpoint's norm weights w are stored as 1 + w (computed in float32, then cast to the model dtype), so every
norm is an ordinary weighted RMSNorm and a quantization scale folds into it as into Llama's. The norm itself
rounds as transformers' Gemma norms do: the weight multiplies in float32, then one rounding (olmo2_rms_norm).

Attention soft-capping (Gemma 2) runs on the torch path (attention.py's _decode_reference and _prefill), not in
kiln's C++ or Triton kernels; Gemma 3's windows run in them (their decode skips the keys before the window). The KV
cache holds every token of every layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engines.torch.attention import AttentionMetadata, paged_attention
from engines.torch.models import llama
from engines.torch.models.architecture import CheckpointPart
from engines.torch.models.llama import LlamaArgs, LlamaForCausalLM, rope_tables
from engines.torch.models.olmo2 import olmo2_rms_norm
from engines.torch.models.topology import NormGroup, QuantTopology, RowFold


@dataclass
class GemmaArgs(LlamaArgs):
    query_pre_attn_scalar: float = 0.0
    attn_softcap: float | None = None
    final_softcap: float | None = None
    head_norms: bool = False  # Gemma 3's q_norm and k_norm
    local_inv_freq: torch.Tensor | None = None  # Gemma 3's sliding layers' RoPE (the global ones use inv_freq)
    local_rope_scaling: float = 1.0


def _check_activation(config: Any) -> None:
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"Activation {act!r} is not supported for {config.model_type} (only gelu_pytorch_tanh).")


def _base_args(config: Any, inv_freq: torch.Tensor, scaling: float) -> LlamaArgs:
    head_dim = config.head_dim
    return LlamaArgs(
        model_type=config.model_type,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
        qkv_bias=bool(getattr(config, "attention_bias", False)),
        o_bias=bool(getattr(config, "attention_bias", False)),
        max_position_embeddings=config.max_position_embeddings,
        layer_windows=llama.layer_windows(config),  # sliding layers alternate with global ones
        inv_freq=inv_freq,
        rope_scaling=scaling,
    )


def gemma2_args(config: Any) -> GemmaArgs:
    _check_activation(config)
    inv_freq, scaling = llama._rope_parameters(config, config.head_dim)
    return GemmaArgs(
        **vars(_base_args(config, inv_freq, scaling)),
        query_pre_attn_scalar=config.query_pre_attn_scalar,
        attn_softcap=config.attn_logit_softcapping,
        final_softcap=config.final_logit_softcapping,
    )


def _gemma3_rope(config: Any, layer_type: str) -> tuple[torch.Tensor, float]:
    """inv_freq and scaling of one layer type, as Gemma3RotaryEmbedding computes them."""
    params = config.rope_parameters[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        dim = config.head_dim
        return 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    if rope_type == "dynamic":
        raise ValueError("Dynamic NTK rope scaling is not supported (its frequencies depend on the sequence length).")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"Rope scaling type {rope_type!r} is not supported.")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", layer_type=layer_type)
    return inv_freq.float(), float(scaling)


def gemma3_args(config: Any) -> GemmaArgs:
    _check_activation(config)
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("Gemma 3 with use_bidirectional_attention (an embedding model) is not supported.")
    inv_freq, scaling = _gemma3_rope(config, "full_attention")
    local_inv_freq, local_scaling = _gemma3_rope(config, "sliding_attention")
    return GemmaArgs(
        **vars(_base_args(config, inv_freq, scaling)),
        query_pre_attn_scalar=config.query_pre_attn_scalar,
        final_softcap=config.final_logit_softcapping,  # Gemma3Attention never soft-caps its scores
        head_norms=True,
        local_inv_freq=local_inv_freq,
        local_rope_scaling=local_scaling,
    )


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return olmo2_rms_norm(x, weight, eps)  # weight: 1 + the checkpoint's, multiplied in float32


class GemmaForCausalLM(LlamaForCausalLM):
    args: GemmaArgs
    fused_rope = False  # two RoPE tables (Gemma 3) and soft-capped attention (Gemma 2): the torch RoPE path

    def __init__(self, args: GemmaArgs):
        super().__init__(args)
        self.scale = args.query_pre_attn_scalar**-0.5
        self.capped_attention = args.attn_softcap is not None  # no decode kernel soft-caps
        self.local_cos: torch.Tensor | None = None  # Gemma 3's sliding layers' tables
        self.local_sin: torch.Tensor | None = None

    @classmethod
    def layer_norms(cls, args: LlamaArgs) -> dict[str, int]:
        norms = dict.fromkeys(("input_norm", "attention_out_norm", "pre_mlp_norm", "mlp_out_norm"), args.hidden_size)
        if getattr(args, "head_norms", False):
            norms |= {"q_norm": args.head_dim, "k_norm": args.head_dim}
        return norms

    def init_rope(self, max_positions: int, dtype: torch.dtype, device) -> None:
        super().init_rope(max_positions, dtype, device)
        a = self.args
        if a.local_inv_freq is not None and (self.local_cos is None or self.local_cos.shape != self.cos.shape):
            self.local_cos, self.local_sin = rope_tables(
                a.local_inv_freq, a.local_rope_scaling, self.cos.shape[0], dtype, device
            )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # transformers multiplies by sqrt(hidden) as a float32 tensor cast to the model dtype
        return x * torch.tensor(self.args.hidden_size**0.5).to(x.dtype)

    def layer_input(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return _norm(x, layer.input_norm, self.args.rms_norm_eps)

    def qkv(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        qkv = layer.qkv_proj(h)
        a = self.args
        if a.head_norms:
            heads = qkv.view(qkv.shape[0], a.num_heads + 2 * a.num_kv_heads, a.head_dim)
            q, k = heads[:, : a.num_heads], heads[:, a.num_heads : a.num_heads + a.num_kv_heads]
            q.copy_(_norm(q, layer.q_norm, a.rms_norm_eps))
            k.copy_(_norm(k, layer.k_norm, a.rms_norm_eps))
        return qkv

    def attention(
        self,
        layer: nn.Module,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        if layer.window is not None and self.local_cos is not None:
            cos, sin = self.local_cos[positions].unsqueeze(1), self.local_sin[positions].unsqueeze(1)
        q, k, v = self.rotated_qkv(layer, qkv, cos, sin)
        return paged_attention(q, k, v, kv_cache, meta, self.scale, self.args.attn_softcap, layer.window)

    def after_attention(
        self, layer: nn.Module, x: torch.Tensor, out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        eps = self.args.rms_norm_eps
        x = x + _norm(out, layer.attention_out_norm, eps)
        return x, _norm(x, layer.pre_mlp_norm, eps)

    def after_mlp(
        self, layer: nn.Module, x: torch.Tensor, out: torch.Tensor, next_layer: nn.Module | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        eps = self.args.rms_norm_eps
        x = x + _norm(out, layer.mlp_out_norm, eps)
        return x, _norm(x, self.norm if next_layer is None else next_layer.input_norm, eps)

    def mlp(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        gate, up = layer.gate_up_proj(h).chunk(2, dim=-1)  # [gate; up]
        return layer.down_proj(F.gelu(gate, approximate="tanh") * up)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        cap = self.args.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap


GEMMA_NORMS = {
    "input_norm": "input_layernorm",
    "attention_out_norm": "post_attention_layernorm",
    "pre_mlp_norm": "pre_feedforward_layernorm",
    "mlp_out_norm": "post_feedforward_layernorm",
}
HEAD_NORMS = {"q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}


def read_hf_checkpoint(
    folder: Path,
    args: GemmaArgs,
    dtype: torch.dtype,
    device: torch.device,
    linear: llama.LinearReader | None = None,
    part: CheckpointPart | None = None,
) -> dict[str, torch.Tensor]:
    """Llama's reader with Gemma's norm names; every norm weight w becomes 1 + w (see the module docstring).
    linear, part: as llama.read_hf_checkpoint's (a pre-quantized checkpoint's projections; one part of it)."""
    norms = GEMMA_NORMS | (HEAD_NORMS if args.head_norms else {})
    tensors = llama.read_hf_checkpoint(folder, args, dtype, device, norms=norms, linear=linear, part=part)
    names = ["norm.weight"] + [f"layers.{i}.{n}.weight" for i in range(args.num_layers) for n in norms]
    for name in (n for n in names if n in tensors):  # those of `part`
        tensors[name] = (tensors[name].float() + 1.0).to(dtype)
    return tensors


def assemble(args: GemmaArgs, tensors, formats, dtype, device, layers: bool = True) -> LlamaForCausalLM:
    return llama.assemble(args, tensors, formats, dtype, device, model_class=GemmaForCausalLM, layers=layers)


def param_count(args: GemmaArgs) -> int:
    # Llama's count has two [hidden] norms per layer; Gemma has four (and Gemma 3 its q/k norms)
    extra = 2 * args.hidden_size + (2 * args.head_dim if args.head_norms else 0)
    return llama.param_count(args) + args.num_layers * extra


# input_norm and pre_mlp_norm feed qkv and gate_up and are per-channel weights: a scale folds into them exactly.
# The output norms (attention_out_norm, mlp_out_norm) come after o_proj and down_proj and feed only the residual
# add, so they produce no projection's input; o_proj and down_proj fold into the v and `up` rows as in Llama
# (v is not normalized, not even in Gemma 3, and down_proj reads gelu(gate) * up).
TOPOLOGY = QuantTopology(
    norm_groups=(NormGroup("input_norm", ("qkv_proj",)), NormGroup("pre_mlp_norm", ("gate_up_proj",))),
    row_folds=(
        RowFold("down_proj", "gate_up_proj", llama.up_rows, reciprocal=True),
        RowFold("o_proj", "qkv_proj", llama.v_rows, smooth=False),
    ),
)

GEMMA2 = dataclasses.replace(
    llama.LLAMA,
    model_type="gemma2",
    args_from_config=gemma2_args,
    model_class=GemmaForCausalLM,
    read_checkpoint=read_hf_checkpoint,
    assemble=assemble,
    topology=TOPOLOGY,
    param_count=param_count,
)
GEMMA3_TEXT = dataclasses.replace(GEMMA2, model_type="gemma3_text", args_from_config=gemma3_args)
