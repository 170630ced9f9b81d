"""The parameter count of a Llama-style decoder, the one formula behind `kiln plan` (from any config.json,
without loading torch) and the build's size estimates (from an architecture's args)."""

from __future__ import annotations


def decoder_param_count(
    *,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    intermediate: int,
    vocab: int,
    tied_embeddings: bool,
    qkv_bias: bool,
    experts: int = 1,
) -> int:
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o + k, v
    if qkv_bias:
        attention += (heads + 2 * kv_heads) * head_dim
    mlp = 3 * hidden * intermediate * experts  # gate, up, down (per expert for MoE)
    if experts > 1:
        mlp += hidden * experts  # router
    per_layer = attention + mlp + 2 * hidden  # two RMSNorms
    embeddings = vocab * hidden * (1 if tied_embeddings else 2)
    return layers * per_layer + embeddings + hidden  # final norm
