"""Turns a scheduled step into tensors (input ids, positions, slot_mapping, block tables), runs the
model over the KV cache, and returns float32 logits for the sequences that sample this step."""

from __future__ import annotations

import torch

from engines.quant.fp8 import FP8_DTYPE
from engines.torch.attention import AttentionMetadata, KVLayer, PrefillSpan, can_fuse_decode
from engines.torch.models.llama import LlamaForCausalLM
from engines.torch.scheduler import ScheduledChunk


class KVCache:
    """Per layer, one tensor [2 (key, value), kv_heads, num_blocks, block_size, head_dim].

    kv_cache_dtype "model" stores the model's dtype and `layers` holds plain tensors; "int8" and "fp8"
    store int8 / float8_e4m3fn codes and `layers` holds KVLayers carrying the static float32 scales
    (scales [num_layers, 2 (k, v), kv_heads]; fp8 without scales uses 1.0, vLLM's default).
    """

    INT8_NEEDS_SCALES = "an INT8 KV cache needs calibrated scales: build an engine with `kiln build --kv-cache-dtype int8`."

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype, device,
                 kv_cache_dtype: str = "model", scales: torch.Tensor | None = None):
        shape = (num_layers, 2, kv_heads, num_blocks, block_size, head_dim)
        self.kv_cache_dtype = kv_cache_dtype
        self.data = torch.zeros(shape, dtype=self.storage_dtype(kv_cache_dtype, dtype), device=device)
        if kv_cache_dtype == "model":
            self.layers = list(self.data.unbind(0))
            return
        if scales is None:
            if kv_cache_dtype == "int8":
                raise ValueError(self.INT8_NEEDS_SCALES)
            scales = torch.ones(num_layers, 2, kv_heads)
        self.scales = scales.to(device=device, dtype=torch.float32).clamp(min=1e-12)  # a zero amax must not divide by 0
        self.layers = [KVLayer(d, s[0], s[1], kv_cache_dtype) for d, s in zip(self.data.unbind(0), self.scales)]

    @staticmethod
    def storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
        return {"model": model_dtype, "int8": torch.int8, "fp8": FP8_DTYPE}[kv_cache_dtype]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype) -> int:
        """dtype: the storage dtype (static scales cost no per-token bytes)."""
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def copy_block(self, src: int, dst: int) -> None:
        data = self.data if self.kv_cache_dtype == "model" else self.data.view(torch.int8)
        data[:, :, :, dst] = data[:, :, :, src]


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, block_size: int, device: torch.device):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = device

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, list[ScheduledChunk]]:
        """Run one step. Returns (float32 logits, the chunks that sample, in row order). A sampling chunk
        owns 1 + len(draft_token_ids) consecutive rows: its last token's, then one per speculative token."""
        bs = self.block_size
        # Decode rows first (batched attention), then prefill chunks (one SDPA each).
        is_decode = [c.runs_as_decode_rows for c in chunks]
        decodes = [c for c, d in zip(chunks, is_decode) if d]
        prefills = [c for c, d in zip(chunks, is_decode) if not d]
        ordered = decodes + prefills
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for c in ordered:
            seq = c.seq
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start : start + c.num_tokens])
            input_ids.extend(c.draft_token_ids)
            table = seq.block_table
            for pos in range(start, start + c.num_query_tokens):
                positions.append(pos)
                slots.append(table[pos // bs] * bs + pos % bs)

        to_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)  # noqa: E731
        decode_tables = decode_lens = None
        max_ctx = 0
        num_decode_rows = sum(c.num_query_tokens for c in decodes)
        if decodes:
            max_ctx = max(c.seq.num_computed_tokens + c.num_query_tokens for c in decodes)
            width = -(-max_ctx // bs)
            tables, lens = [], []
            for c in decodes:
                table = c.seq.block_table[:width]
                table = table + [0] * (width - len(table))
                start = c.seq.num_computed_tokens
                for j in range(c.num_query_tokens):
                    tables.append(table)
                    lens.append(start + j + 1)
            decode_tables = to_tensor(tables)
            decode_lens = to_tensor(lens)
        spans = []
        q_start = num_decode_rows
        for c in prefills:
            ctx = c.seq.num_computed_tokens + c.num_query_tokens
            table = to_tensor(c.seq.block_table[: -(-ctx // bs)])
            spans.append(PrefillSpan(q_start, c.num_query_tokens, ctx, table))
            q_start += c.num_query_tokens
        position_ids = to_tensor(positions)
        fused = can_fuse_decode(self.device, self.model.cos.dtype, bool(spans))
        meta = AttentionMetadata(
            slot_mapping=to_tensor(slots),
            num_decode_tokens=num_decode_rows,
            decode_block_tables=decode_tables,
            decode_context_lens=decode_lens,
            decode_max_context=max_ctx,
            prefills=spans,
            positions=position_ids if fused else None,
            fused=fused,
        )
        hidden = self.model(to_tensor(input_ids), position_ids, meta, self.kv_cache.layers)

        sampling = [c for c in ordered if c.completes]
        rows, end = [], 0
        for c in ordered:
            end += c.num_query_tokens
            if c.completes:
                rows.extend(range(end - 1 - len(c.draft_token_ids), end))
        logits = self.model.compute_logits(hidden[to_tensor(rows)]) if rows else hidden.new_empty((0, 0))
        return logits, sampling
