"""The 2-layer random Llama the build tests quantize, sized to the default tokenizer's vocabulary."""

from __future__ import annotations

from transformers import LlamaConfig


def tiny_llama_config(num_key_value_heads: int) -> LlamaConfig:
    """Untied head; 4 query heads over `num_key_value_heads` KV heads (4: multi-head, 2: grouped-query)."""
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=1024,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
