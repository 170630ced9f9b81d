"""Run whole token sequences through a model outside the serving engine: the build step's
calibration pass and accuracy scoring need every position's activations or logits, one sequence
at a time, with nothing scheduled or sampled.

Each call is one prefill of the whole sequence into a private paged KV cache (slots 0..T-1 of
blocks 0..), so the model runs exactly the attention code the server runs, a quantized KV cache
included.
"""

from __future__ import annotations

import torch

from engines.torch.attention import AttentionMetadata, PrefillSpan
from engines.torch.model_runner import KVCache
from engines.torch.models.protocol import CausalLM


def prefill_metadata(t: int, block_size: int, device: torch.device) -> tuple[torch.Tensor, AttentionMetadata]:
    """Positions and attention metadata of one whole sequence of `t` tokens prefilled into slots 0..t-1 (the torch
    attention path)."""
    positions = torch.arange(t, device=device)
    table = torch.arange(-(-t // block_size), device=device)
    meta = AttentionMetadata(
        slot_mapping=positions,
        num_decode_tokens=0,
        decode_block_tables=None,
        decode_context_lens=None,
        decode_max_context=0,
        prefills=[PrefillSpan(0, t, t, table)],
    )
    return positions, meta


class SequenceRunner:
    def __init__(
        self,
        model: CausalLM,
        dtype: torch.dtype,
        device: torch.device,
        max_tokens: int,
        block_size: int = 16,
        kv_cache_dtype: str = "model",
        kv_cache_scales: torch.Tensor | None = None,
    ):
        a = model.args
        self.model, self.device, self.block_size, self.max_tokens = model, device, block_size, max_tokens
        num_blocks = -(-max_tokens // block_size)
        extra = {} if kv_cache_dtype == "model" else {"kv_cache_dtype": kv_cache_dtype, "scales": kv_cache_scales}
        self.kv_cache = KVCache(
            a.num_layers, num_blocks, block_size, a.num_kv_heads, a.head_dim, dtype, device, **extra
        )
        model.init_rope(max_tokens, dtype, device)

    @torch.inference_mode()
    def hidden(self, token_ids: list[int]) -> torch.Tensor:  # -> [T, hidden]
        t = len(token_ids)
        if not 0 < t <= self.max_tokens:
            raise ValueError(f"sequence of {t} tokens; this runner holds 1..{self.max_tokens}")
        positions, meta = prefill_metadata(t, self.block_size, self.device)
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        return self.model(ids, positions, meta, self.kv_cache.layers)

    @torch.inference_mode()
    def logits(self, token_ids: list[int], start: int = 0, end: int | None = None) -> torch.Tensor:
        """float32 logits [end - start, vocab] predicting the token after each position in [start, end)."""
        return self.model.compute_logits(self.hidden(token_ids)[start:end])

    def kv_amax(self, num_tokens: int) -> torch.Tensor:
        """max |k| and max |v| per layer and KV head over the first num_tokens slots of the last
        sequence: float32 [layers, 2, kv_heads] (the unquantized cache only)."""
        data = self.kv_cache.data  # [layers, 2, kvh, blocks, block_size, hd]
        flat = data.flatten(3, 4)[:, :, :, :num_tokens]  # [layers, 2, kvh, T, hd]
        return flat.abs().float().amax(dim=(-1, -2))
