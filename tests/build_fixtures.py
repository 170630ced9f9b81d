"""What the build tests share: the 2-layer random Llama they quantize and small, fast build options."""

from __future__ import annotations

from pathlib import Path

from transformers import LlamaConfig

from engines.build.builder import BuildOptions


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


def build_options(model: Path | None, output: Path, **kw) -> BuildOptions:
    """A build small enough for a test: few calibration and evaluation prompts, no speed measurement."""
    base = dict(
        model=str(model) if model else None,
        output=str(output),
        kv_cache_dtype="model",
        calib_samples=16,
        eval_samples=4,
        eval_tokens=8,
        bench=False,
        progress=False,
    )
    base.update(kw)
    return BuildOptions(**base)
