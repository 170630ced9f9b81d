"""Whole prompts of one length, adjacent in a step, share one SDPA call (attention._fresh_runs); each sequence's
output must be bit for bit what its own SDPA call gives, in fp32 and bf16, next to spans that cannot join
(another length, a cached prefix)."""

from __future__ import annotations

import pytest
import torch

from engines.torch.attention import AttentionMetadata, PrefillSpan, _attend, _fresh_runs, _prefill

HEADS, KV_HEADS, HD, BS, BLOCKS = 6, 2, 32, 4, 16


def _spans():
    lens = [(5, 5), (5, 5), (5, 5), (7, 7), (5, 5), (5, 5), (3, 19), (5, 5)]  # (q_len, ctx_len)
    spans, start = [], 0
    for i, (q_len, ctx) in enumerate(lens):
        table = torch.arange(i * 5, i * 5 + (ctx + BS - 1) // BS) % BLOCKS
        spans.append(PrefillSpan(start, q_len, ctx, table))
        start += q_len
    return spans, start


def test_groups():
    spans, _ = _spans()
    assert [len(g) for g in _fresh_runs(spans)] == [3, 1, 2, 1, 1]


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_prompts_equal_their_own_calls(dtype, strided):
    gen = torch.Generator().manual_seed(0)
    spans, total = _spans()
    q = torch.randn(total, HEADS, HD, generator=gen).to(dtype)
    k = torch.randn(total, KV_HEADS, HD, generator=gen).to(dtype)
    v = torch.randn(total, KV_HEADS, HD, generator=gen).to(dtype)
    if strided:  # as a quantized cache's prefill hands them over: views of a [2, kv_heads, T, hd] tensor
        k, v = torch.stack((k, v)).transpose(1, 2).contiguous().transpose(1, 2)
    cache = torch.randn(2, KV_HEADS, BLOCKS, BS, HD, generator=gen).to(dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.int64),
        num_decode_tokens=0,
        decode_block_tables=None,
        decode_context_lens=None,
        decode_max_context=0,
        prefills=spans,
    )
    out = _attend(q, k, v, cache, meta, HD**-0.5)
    for span in spans:
        rows = slice(span.q_start, span.q_start + span.q_len)
        alone = _prefill(q[rows], k[rows], v[rows], cache, span, HD**-0.5)
        assert torch.equal(out[rows], alone), span
