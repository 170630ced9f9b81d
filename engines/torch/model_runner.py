"""Turns a scheduled step into tensors (input ids, positions, slot_mapping, block tables), runs the
model over the KV cache, and returns float32 logits for the sequences that sample this step.
Steps of plain decodes can run padded to a fixed batch size through DecodeGraphs (CUDA graphs)."""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from engines.quant.fp8 import FP8_DTYPE
from engines.torch import lazy_memory
from engines.torch.attention import AttentionMetadata, KVLayer, PrefillSpan
from engines.torch.attention_backend import AttentionBackend, select_attention_backend
from engines.torch.models.protocol import CausalLM
from engines.torch.scheduler import ScheduledChunk

log = logging.getLogger("kiln.engine")


class KVCache:
    """Per layer, one tensor [2 (key, value), kv_heads, num_blocks, block_size, head_dim].

    kv_cache_dtype "model" stores the model's dtype and `layers` holds plain tensors; "int8" and "fp8"
    store int8 / float8_e4m3fn codes and `layers` holds KVLayers carrying the static float32 scales
    (scales [num_layers, 2 (k, v), kv_heads]; fp8 without scales uses 1.0, vLLM's default).
    scratch_block adds one block past the pool, id num_blocks, which BlockManager(num_blocks) never hands
    out: DecodeGraphs' padding rows write their keys and values there.
    """

    INT8_NEEDS_SCALES = (
        "an INT8 KV cache needs calibrated scales: build an engine with `kiln build --kv-cache-dtype int8`."
    )

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype,
        device,
        kv_cache_dtype: str = "model",
        scales: torch.Tensor | None = None,
        scratch_block: bool = False,
    ):
        self.scratch_block = num_blocks if scratch_block else None
        shape = (num_layers, 2, kv_heads, num_blocks + scratch_block, block_size, head_dim)
        self.kv_cache_dtype = kv_cache_dtype
        storage = self.storage_dtype(kv_cache_dtype, dtype)
        # on the host, pages become resident as blocks are first written, not all at allocation (lazy_memory)
        if torch.device(device).type == "cpu":
            self.data = lazy_memory.zeros(shape, storage)
        else:
            self.data = torch.zeros(shape, dtype=storage, device=device)
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


class GraphCaptureError(RuntimeError):
    """A decode step could not be captured as a CUDA graph."""


def decode_buckets(max_num_seqs: int) -> list[int]:
    """The batch sizes decode steps are padded to: 1, 2, 4, 8, then powers of two and the halfway sizes
    between (16, 24, 32, 48, 64, 96, ...), below max_num_seqs, which is the last."""
    sizes, size = [1, 2, 4, 8], 16
    while size < max_num_seqs:
        sizes += [size, size * 3 // 2]
        size *= 2
    return [b for b in sizes if b < max_num_seqs] + [max_num_seqs]


class DecodeGraphs:
    """Steps of plain decodes (one token per sequence, no prefill, no speculative rows) padded to a bucket
    size and run from static input buffers, so that on CUDA each bucket's forward pass is one CUDA graph
    replayed every step: one launch instead of hundreds of small kernels. A bucket's graph is captured the
    first time a step needs it (no startup cost, nothing held for batch sizes never seen; that step pays
    a warm-up run and the capture). Off CUDA nothing is captured: the padded buffers run eagerly, which is
    how tests check the padding against the plain path.

    A step of n sequences runs at the smallest bucket >= n. The bucket - n padding rows decode token 0 at
    position 0 into slot 0 of the KV cache's scratch block, attend to that slot alone (context length 1),
    and their rows are dropped. Block tables are max_model_len's blocks wide; the graph's attention must read
    context lengths from the tensor alone, which on CUDA is the Triton kernel (ModelRunner turns graphs off
    where it cannot run). Steps that do not fit (prefills, verification rows, more sequences than the
    largest bucket, a context past the tables' width) run eagerly.
    """

    def __init__(
        self,
        model: CausalLM,
        kv_cache: KVCache,
        block_size: int,
        device: torch.device,
        max_num_seqs: int,
        max_model_len: int,
        attention: AttentionBackend,
    ):
        if kv_cache.scratch_block is None:
            raise ValueError("decode graphs need a KV cache with a scratch block (KVCache(scratch_block=True)).")
        self.model, self.kv_cache, self.block_size, self.device = model, kv_cache, block_size, device
        self.attention = attention
        self.buckets = decode_buckets(max_num_seqs)
        self.width = -(-max_model_len // block_size)
        rows = self.buckets[-1]
        # input ids, positions, slots, context lengths: one buffer, so one host-to-device copy per step
        self.inputs = torch.zeros(4, rows, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(rows, self.width, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket -> (graph, its hidden states)
        self.pool = None  # one memory pool for all graphs: they never run at the same time

    def fits(self, chunks: list[ScheduledChunk]) -> bool:
        return (
            len(chunks) <= self.buckets[-1]
            and all(c.num_query_tokens == 1 and c.runs_as_decode_rows for c in chunks)
            and max(c.seq.num_computed_tokens for c in chunks) < self.width * self.block_size
        )

    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Hidden states [len(chunks), hidden] of a step that fits."""
        n, bs, scratch = len(chunks), self.block_size, self.kv_cache.scratch_block
        bucket = next(b for b in self.buckets if b >= n)
        pad = bucket - n
        positions = [c.seq.num_computed_tokens for c in chunks]
        ids = [c.seq.token_ids[p] for c, p in zip(chunks, positions)]
        slots = [c.seq.block_table[p // bs] * bs + p % bs for c, p in zip(chunks, positions)]
        width = max(positions) // bs + 1  # columns past it keep stale ids that no context length reaches
        tables = [c.seq.block_table[:width] for c in chunks]
        tables = [t + [0] * (width - len(t)) for t in tables] + [[scratch] + [0] * (width - 1)] * pad
        host = torch.tensor(
            [
                ids + [0] * pad,
                positions + [0] * pad,
                slots + [scratch * bs] * pad,
                [p + 1 for p in positions] + [1] * pad,
            ]
        )
        self.inputs[:, :bucket].copy_(host)
        self.block_tables[:bucket, :width].copy_(torch.tensor(tables))
        if self.device.type != "cuda":
            return self._forward(bucket, max(positions) + 1)[:n]
        graph, hidden = self.graphs.get(bucket) or self._capture(bucket)
        graph.replay()
        return hidden[:n]

    def _forward(self, bucket: int, max_context: int) -> torch.Tensor:
        ids, positions, slots, lens = self.inputs[:, :bucket]
        meta = AttentionMetadata(
            slot_mapping=slots,
            num_decode_tokens=bucket,
            decode_block_tables=self.block_tables[:bucket],
            decode_context_lens=lens,
            decode_max_context=max_context,
            prefills=[],
            positions=positions if self.attention.fused_rope else None,
            backend=self.attention,
        )
        return self.model(ids, positions, meta, self.kv_cache.layers)

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # the largest context the tables hold: decode_max_context is not read by the Triton kernel
        forward = lambda: self._forward(bucket, self.width * self.block_size)  # noqa: E731
        # Warm up outside the capture (Triton compiles, cuBLAS allocates its workspace). It runs this very
        # step, so the keys and values it writes are the ones the replay writes again.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            forward()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                hidden = forward()
        except RuntimeError as exc:  # the warm-up already wrote this step's keys and values: rerunning is harmless
            raise GraphCaptureError(str(exc).splitlines()[0]) from exc
        self.pool = graph.pool()
        self.graphs[bucket] = graph, hidden
        log.info("captured a CUDA graph for decode steps of %d sequences", bucket)
        return graph, hidden


class StepLogits(NamedTuple):
    logits: torch.Tensor
    sampling: list[ScheduledChunk]
    # (chunk, first position, float32 logits [count, vocab]) of the prompt positions whose logprobs were asked for
    prompt: list[tuple[ScheduledChunk, int, torch.Tensor]]


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        kv_cache: KVCache,
        block_size: int,
        device: torch.device,
        max_num_seqs: int = 0,
        max_model_len: int = 0,
        decode_graphs: bool = False,
        attention: AttentionBackend | None = None,
    ):
        """decode_graphs: run plain decode steps through DecodeGraphs (kv_cache needs its scratch block), whose
        static buffers hold max_num_seqs sequences of up to max_model_len tokens. attention: the kernels every
        step runs; None selects them here, once (init_rope has set the model's dtype)."""
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = device
        self.attention = attention or select_attention_backend(
            device, model.cos.dtype, model.args.head_dim, fused_rope=model.fused_rope, capped=model.capped_attention
        )
        self.graphs = None
        if decode_graphs and self._graph_attention_runs():
            self.graphs = DecodeGraphs(model, kv_cache, block_size, device, max_num_seqs, max_model_len, self.attention)

    def _graph_attention_runs(self) -> bool:
        """On CUDA, whether the decode attention reads context lengths from tensors only (the Triton kernel; a
        graph would freeze the torch path's per-step context length)."""
        if self.device.type != "cuda" or self.attention.graph_safe:
            return True
        log.warning(
            "CUDA graphs are off: the Triton decode attention kernel cannot run here (triton missing, "
            "a GPU below compute capability 8.0, or head_dim over 256); decode steps run eagerly."
        )
        return False

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> StepLogits:
        """Run one step: float32 logits of the chunks that sample (in row order; a sampling chunk owns
        1 + len(draft_token_ids) consecutive rows: its last token's, then one per speculative token), and
        those of the prompt positions whose logprobs were asked for."""
        if self.graphs is not None and self.graphs.fits(chunks):
            try:
                return self._logits(self.graphs.run(chunks), chunks)
            except GraphCaptureError as exc:  # e.g. an op that syncs with the host: serve on, eagerly
                log.warning("CUDA graphs are off: capturing a decode step failed (%s); decode steps run eagerly.", exc)
                self.graphs = None
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
        meta = AttentionMetadata(
            slot_mapping=to_tensor(slots),
            num_decode_tokens=num_decode_rows,
            decode_block_tables=decode_tables,
            decode_context_lens=decode_lens,
            decode_max_context=max_ctx,
            prefills=spans,
            positions=position_ids if self.attention.fused_rope else None,
            backend=self.attention,
        )
        return self._logits(self.model(to_tensor(input_ids), position_ids, meta, self.kv_cache.layers), ordered)

    def _logits(self, hidden: torch.Tensor, ordered: list[ScheduledChunk]) -> StepLogits:
        sampling = [c for c in ordered if c.completes]
        rows, end = [], 0
        prompt = []
        for c in ordered:
            start = end
            end += c.num_query_tokens
            if c.completes:
                rows.extend(range(end - 1 - len(c.draft_token_ids), end))
            first, count = c.prompt_logprob_positions()
            if count:
                prompt.append(
                    (c, first, self.model.compute_logits(hidden[start + first - c.seq.num_computed_tokens :][:count]))
                )
        logits = (
            self.model.compute_logits(hidden[torch.tensor(rows, dtype=torch.long, device=self.device)])
            if rows
            else hidden.new_empty((0, 0))
        )
        return StepLogits(logits, sampling, prompt)
