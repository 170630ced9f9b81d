"""Paged attention on top of a block-structured KV cache (CPU path; any device runs it).

The KV cache of one layer is one tensor [2 (key, value), kv_heads, num_blocks, block_size, head_dim]:
one gather fetches keys and values of every head, already in the [kv_heads, tokens, head_dim]
order the matmuls want, so a decode step copies the context once (the gather) and not again.
A step's tokens arrive flattened: first one token per decoding sequence, then the chunks of the
sequences being prefilled. New keys/values are written into their slots first, then:
- decode: the sequences' blocks are gathered, the query heads sharing a KV head are folded into
  one batched matmul, and softmax runs in float32 (bf16 SDPA with one query token is the slow
  path, docs/performance.md);
- prefill: SDPA per sequence, with a lower-right causal mask when the chunk is shorter than the
  context (chunked prefill, prefix-cache hit). SDPA's is_causal=True would mask top-left. Adjacent
  whole prompts of one length share one batched SDPA call.

A quantized cache layer (KVLayer: int8 or float8_e4m3fn codes, static float32 scales per KV head)
quantizes on write and dequantizes after the gather. Decode folds the key scale into the query and
the value scale into the output (a [kv_heads] multiply instead of one over the whole context).
Prefill attends to the dequantized codes of its own chunk too, never the raw keys/values, so its
output does not depend on whether a prefix came from the cache or on how the prompt was chunked.

Which kernel runs the decode rows, and whether RoPE and the cache write are fused, is the engine's
AttentionBackend (attention_backend.py), chosen once at load and carried by each step's AttentionMetadata.

A sliding-window layer (Mistral, Qwen2/3 with use_sliding_window, Gemma's local layers, Phi-3) sees only the
last `window` keys (transformers: key > query - window): the decode kernels skip the keys before it, prefill masks
them. Soft-capped scores (Gemma 2: softcap * tanh(score / softcap)) run on the torch path whatever the backend:
_decode_reference and _prefill take a soft-cap, neither kernel nor SDPA does. The cache holds every token of every
layer (a global layer, and a prefix-cache hit, reads the whole context), so a window changes no block accounting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engines.quant.fp8 import FP8_DTYPE, FP8_MAX
from engines.torch.attention_backend import TORCH_ATTENTION, AttentionBackend
from engines.torch.kernels import rope_kv
from engines.torch.layers.quantized import fp8_e4m3_to_scaled


@dataclass
class PrefillSpan:
    """One sequence's chunk inside the flat batch: queries [q_start, q_start + q_len) attend to
    the first ctx_len tokens of the sequence (its cached prefix plus this chunk)."""

    q_start: int
    q_len: int
    ctx_len: int
    block_table: torch.Tensor  # [num_blocks_of_seq] int64


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: flat cache slot (block * block_size + offset) per new token
    num_decode_tokens: (
        int  # the first num_decode_tokens tokens are decode rows, row i attending to decode_context_lens[i] tokens
    )
    decode_block_tables: torch.Tensor | None  # [num_decode, max_blocks] int64, padded with 0
    decode_context_lens: torch.Tensor | None  # [num_decode] int64, including the new token
    decode_max_context: int
    prefills: list[PrefillSpan]
    positions: torch.Tensor | None = None  # [T] int64; set when the step runs fused_attention
    # the engine's kernels, chosen once (attention_backend.select_attention_backend); the default is the torch
    # path, e.g. for SequenceRunner's prefills
    backend: AttentionBackend = TORCH_ATTENTION

    @property
    def fused(self) -> bool:
        """RoPE and the cache write by the rope_kv kernel (fused_attention)."""
        return self.backend.fused_rope


@dataclass
class KVLayer:
    """One layer of a quantized KV cache: value = code * scale, with a static scale per KV head."""

    data: torch.Tensor  # [2 (key, value), kv_heads, num_blocks, block_size, head_dim] int8 or float8_e4m3fn
    k_scale: torch.Tensor  # [kv_heads] float32
    v_scale: torch.Tensor  # [kv_heads] float32
    kind: str  # "int8" | "fp8"

    def __post_init__(self):
        # index_copy_ has no float8 CPU kernel: writes and gathers go through an int8 view of the bytes
        self.codes = self.data.view(torch.int8)
        self.scales = torch.stack((self.k_scale, self.v_scale)).float()  # [2, kvh]
        # widen(fp8 codes) is code * 2**-8 (the bit trick); the 2**8 is folded in here, exactly
        self.unit_scales = self.scales * (256.0 if self.kind == "fp8" else 1.0)

    def widen(self, codes: torch.Tensor) -> torch.Tensor:
        """int8 codes (of either kind) -> float32 code * unit, where unit_scales turns it into the value."""
        return codes.float() if self.kind == "int8" else fp8_e4m3_to_scaled(codes, torch.float32)

    def dequantize(self, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # codes [2, kvh, ..., hd] -> values in dtype
        scales = self.unit_scales.view(*self.unit_scales.shape, *[1] * (codes.dim() - 2))
        return self.widen(codes).mul_(scales).to(dtype)

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Quantize k, v [T, kv_heads, head_dim] into their slots; returns their codes [2, kvh, T, hd]."""
        x = torch.stack((k, v)).transpose(1, 2).float() / self.scales[:, :, None, None]  # [2, kvh, T, hd]
        if self.kind == "int8":
            codes = x.round_().clamp_(-127, 127).to(torch.int8)
        else:  # clamp first: e4m3fn has no inf, values past 448 would become NaN
            codes = x.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(torch.int8)
        self.codes.flatten(2, 3).index_copy_(2, slots, codes)
        return codes


def fused_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor | KVLayer,
    meta: AttentionMetadata,
    scale: float,
    heads: int,
    kv_heads: int,
    window: int | None = None,  # as paged_attention's
) -> torch.Tensor:
    """RoPE, the cache write and attention from the QKV projection's output, RoPE and the write in one C++ op
    instead of ~25 (same bits as the torch path); a decode-only step then takes one more op. Returns
    [T, heads, head_dim]."""
    quant = kv_cache if isinstance(kv_cache, KVLayer) else None
    cache = quant.codes if quant else kv_cache
    args = (
        qkv,
        cos,
        sin,
        meta.positions,
        meta.slot_mapping,
        cache,
        quant.scales if quant else None,
        quant.kind if quant else "model",
        heads,
        kv_heads,
    )
    if not meta.prefills:
        return _decode(rope_kv.rope_store(*args), kv_cache, meta, scale, window)
    q, k = rope_kv.rope_store(*args, return_keys=True)
    v = qkv[:, (heads + kv_heads) * q.shape[-1] :].view(qkv.shape[0], kv_heads, q.shape[-1])
    if quant:  # prefill attends to what the cache holds for its own chunk: the codes just written
        codes = quant.codes.flatten(2, 3).index_select(2, meta.slot_mapping)  # [2, kvh, T, hd]
        k, v = quant.dequantize(codes, q.dtype).transpose(1, 2)  # each [T, kvh, hd]
    return _attend(q, k, v, kv_cache, meta, scale, window=window)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    # k, v: [T, kv_heads, head_dim]; each half of the cache viewed as [kv_heads, slots, head_dim]
    flat = kv_cache.flatten(2, 3)
    flat[0].index_copy_(1, slots, k.transpose(0, 1))
    flat[1].index_copy_(1, slots, v.transpose(0, 1))


def paged_attention(
    q: torch.Tensor,  # [T, heads, head_dim]
    k: torch.Tensor,  # [T, kv_heads, head_dim]
    v: torch.Tensor,  # [T, kv_heads, head_dim]
    kv_cache: torch.Tensor | KVLayer,
    meta: AttentionMetadata,
    scale: float,
    softcap: float | None = None,  # scores become softcap * tanh(score / softcap)
    window: int | None = None,  # a query at position p sees keys at positions p - window + 1 .. p
) -> torch.Tensor:  # [T, heads, head_dim]
    if isinstance(kv_cache, KVLayer):
        codes = kv_cache.write(k, v, meta.slot_mapping)
        if meta.prefills:  # prefill attends to what the cache holds for its own chunk
            k, v = kv_cache.dequantize(codes, q.dtype).transpose(1, 2)  # each [T, kvh, hd]
    else:
        write_kv(kv_cache, k, v, meta.slot_mapping)
    return _attend(q, k, v, kv_cache, meta, scale, softcap, window)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache,
    meta: AttentionMetadata,
    scale: float,
    softcap: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Attention of a step whose keys and values are in the cache; k, v: the prefill chunks' own (rotated,
    as the cache holds them), for SDPA without a gather when a chunk has no cached prefix."""
    nd = meta.num_decode_tokens
    if nd and not meta.prefills:
        return _decode_rows(q, kv_cache, meta, scale, softcap, window)
    out = torch.empty_like(q)
    if nd:
        out[:nd] = _decode_rows(q[:nd], kv_cache, meta, scale, softcap, window)
    plain = softcap is None and window is None
    for group in _fresh_runs(meta.prefills) if plain else [[span] for span in meta.prefills]:
        if len(group) > 1:
            rows = slice(group[0].q_start, group[-1].q_start + group[-1].q_len)
            out[rows] = _prefill_batch(q[rows], k[rows], v[rows], len(group), scale)
            continue
        span = group[0]
        rows = slice(span.q_start, span.q_start + span.q_len)
        out[rows] = _prefill(q[rows], k[rows], v[rows], kv_cache, span, scale, softcap, window)
    return out


def _fresh_runs(spans: list[PrefillSpan]) -> list[list[PrefillSpan]]:
    """The spans in order, adjacent ones of one length and without a cached prefix grouped: such a group is one
    SDPA call over a batch (cheaper than one call each, docs/performance.md), with each sequence's
    result bit for bit what its own call gives."""
    groups: list[list[PrefillSpan]] = []
    for span in spans:
        last = groups[-1][-1] if groups else None
        if (
            last is not None
            and span.ctx_len == span.q_len
            and last.ctx_len == last.q_len
            and span.q_len == last.q_len
            and span.q_start == last.q_start + last.q_len
        ):
            groups[-1].append(span)
        else:
            groups.append([span])
    return groups


def _prefill_batch(q, k, v, n: int, scale: float) -> torch.Tensor:
    """n whole prompts of one length laid end to end ([n * L, heads, hd]), each attending causally to itself."""

    def batched(x: torch.Tensor) -> torch.Tensor:  # [n * L, h, hd] -> [n, h, L, hd]
        return x.view(n, x.shape[0] // n, *x.shape[1:]).transpose(1, 2)

    out = F.scaled_dot_product_attention(
        batched(q), batched(k), batched(v), is_causal=True, scale=scale, enable_gqa=True
    )
    return out.transpose(1, 2).reshape(q.shape)


def _gather(kv_cache: torch.Tensor, block_tables: torch.Tensor, length: int) -> torch.Tensor:
    # [2, kvh, blocks, block_size, hd] indexed by block_tables [..., n] -> [2, kvh, ..., n * block_size, hd]
    gathered = kv_cache.index_select(2, block_tables.flatten())  # index_select: ~2x faster than [] indexing
    gathered = gathered.view(*kv_cache.shape[:2], *block_tables.shape, *kv_cache.shape[3:])
    return gathered.flatten(-3, -2)[..., :length, :]


def _decode_rows(q, kv_cache, meta: AttentionMetadata, scale: float, softcap: float | None, window: int | None):
    # no kernel soft-caps
    if softcap is None:
        return _decode(q, kv_cache, meta, scale, window)
    return _decode_reference(q, kv_cache, meta, scale, softcap, window)


def _decode(
    q: torch.Tensor, kv_cache, meta: AttentionMetadata, scale: float, window: int | None = None
) -> torch.Tensor:
    # one op, same math as _decode_reference: C++ on CPU; Triton on CUDA, which reads no Python int per step
    # (CUDA-graph safe, model_runner.DecodeGraphs)
    kernel = meta.backend.decode_kernel
    if kernel is None:
        return _decode_reference(q, kv_cache, meta, scale, window=window)
    quant = kv_cache if isinstance(kv_cache, KVLayer) else None
    return kernel(
        q,
        quant.codes if quant else kv_cache,
        meta.decode_block_tables,
        meta.decode_context_lens,
        scale,
        quant.k_scale if quant else None,
        quant.v_scale if quant else None,
        quant.kind if quant else "model",
        window,
    )


def _decode_reference(
    q: torch.Tensor,
    kv_cache,
    meta: AttentionMetadata,
    scale: float,
    softcap: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    b, heads, head_dim = q.shape
    quant = kv_cache if isinstance(kv_cache, KVLayer) else None
    kv_heads = (quant.codes if quant else kv_cache).shape[1]
    group = heads // kv_heads
    length = meta.decode_max_context
    # float32 throughout: small bf16 batched matmuls are far slower than the casts on CPU
    qg = q.view(b, kv_heads, group, head_dim).transpose(0, 1).float()  # [kvh, b, group, hd]
    if quant:
        keys, values = quant.widen(_gather(quant.codes, meta.decode_block_tables, length))  # each [kvh, b, L, hd]
        qg = qg * quant.unit_scales[0].view(kv_heads, 1, 1, 1)  # q . (k * s) == (q * s) . k
    else:
        keys, values = _gather(kv_cache, meta.decode_block_tables, length).float()  # each [kvh, b, L, hd]
    scores = torch.matmul(qg, keys.transpose(-1, -2)).mul_(scale)  # [kvh, b, group, L]
    if softcap is not None:
        scores = torch.tanh(scores.div_(softcap)).mul_(softcap)
    if b > 1 or window is not None:
        index = torch.arange(length, device=q.device)[None, :]
        hidden = index >= meta.decode_context_lens[:, None]  # [b, L]: padding
        if window is not None:  # the new token sits at context_len - 1
            hidden |= index < meta.decode_context_lens[:, None] - window
        scores.masked_fill_(hidden[None, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, values)  # [kvh, b, group, hd]
    if quant:
        out.mul_(quant.unit_scales[1].view(kv_heads, 1, 1, 1))
    return out.transpose(0, 1).reshape(b, heads, head_dim).to(q.dtype)


def _prefill(
    q, k, v, kv_cache, span: PrefillSpan, scale: float, softcap: float | None = None, window: int | None = None
) -> torch.Tensor:
    if span.ctx_len == span.q_len and softcap is None and window is None:
        # no cached prefix: the chunk's own keys are the whole context
        keys, values, mask, causal = k.transpose(0, 1), v.transpose(0, 1), None, True
    elif span.ctx_len == span.q_len:
        keys, values, mask, causal = k.transpose(0, 1), v.transpose(0, 1), _causal_mask(span, q.device, window), False
    else:
        if isinstance(kv_cache, KVLayer):
            keys, values = kv_cache.dequantize(_gather(kv_cache.codes, span.block_table, span.ctx_len), q.dtype)
        else:
            keys, values = _gather(kv_cache, span.block_table, span.ctx_len)  # each [kvh, ctx, hd]
        mask, causal = _causal_mask(span, q.device, window), False
    if softcap is not None:
        return _softcapped(q, keys, values, mask, scale, softcap)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),  # [1, heads, q_len, hd]
        keys.unsqueeze(0),  # [1, kv_heads, ctx, hd]
        values.unsqueeze(0),
        attn_mask=mask,
        is_causal=causal,
        scale=scale,
        enable_gqa=True,
    )
    return out.squeeze(0).transpose(0, 1)


def _causal_mask(span: PrefillSpan, device, window: int | None) -> torch.Tensor:
    """[q_len, ctx_len] bool, True where a query sees a key: lower-right causal (the chunk ends the context), and
    within the last `window` positions when set (transformers' sliding window: key > query - window)."""
    rows = torch.arange(span.q_len, device=device)[:, None] + (span.ctx_len - span.q_len)
    cols = torch.arange(span.ctx_len, device=device)[None, :]
    mask = cols <= rows
    if window is not None:
        mask &= cols > rows - window
    return mask


def _softcapped(q, keys, values, mask, scale: float, softcap: float) -> torch.Tensor:
    """Attention with soft-capped scores (transformers' Gemma 2 eager attention), scores and softmax in float32.
    q [q_len, heads, hd]; keys, values [kv_heads, ctx, hd]; mask [q_len, ctx] -> [q_len, heads, hd]."""
    heads, kv_heads = q.shape[1], keys.shape[0]
    qf = q.transpose(0, 1).float().reshape(kv_heads, heads // kv_heads * q.shape[0], q.shape[2])  # [kvh, g * q, hd]
    scores = torch.matmul(qf, keys.float().transpose(-1, -2)).mul_(scale)  # [kvh, g * q_len, ctx]
    scores = torch.tanh(scores.div_(softcap)).mul_(softcap)
    scores = scores.view(kv_heads, -1, *mask.shape).masked_fill_(~mask, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1).flatten(1, 2), values.float())  # [kvh, g * q_len, hd]
    return out.view(heads, q.shape[0], q.shape[2]).transpose(0, 1).to(q.dtype)
