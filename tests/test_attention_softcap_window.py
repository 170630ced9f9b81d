"""attention.paged_attention with soft-capped scores and a sliding window (Gemma's layers) against dense attention
over the whole sequence: prefill chunks with and without a cached prefix, and a decode step of two sequences of
different lengths (padding and window masks together), float32 cache."""

from __future__ import annotations

import pytest
import torch

from engines.torch.attention import AttentionMetadata, PrefillSpan, paged_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 16, 4
SCALE = 0.3


def dense(q, k, v, softcap, window):  # q [L, H, D], k, v [L, KVH, D] -> [L, H, D], every row causal
    length, group = q.shape[0], HEADS // KV_HEADS
    keys, values = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("ihd,jhd->hij", q, keys) * SCALE
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    visible = (j <= i) & ((j > i - window) if window is not None else True)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("hij,jhd->ihd", probs, values)


@pytest.mark.parametrize(("softcap", "window"), [(2.0, None), (None, 5), (2.0, 5)])
def test_prefill_chunks_and_batched_decode_match_dense_attention(softcap, window):
    gen = torch.Generator().manual_seed(0)
    lengths = [19, 11]  # each: a first chunk, a second chunk over a cached prefix, then one decode token
    seqs = [tuple(torch.randn(n, h, HEAD_DIM, generator=gen) * 2 for h in (HEADS, KV_HEADS, KV_HEADS)) for n in lengths]
    blocks_each = 8
    cache = torch.zeros(2, KV_HEADS, len(lengths) * blocks_each, BLOCK, HEAD_DIM)
    tables = [torch.arange(s * blocks_each, (s + 1) * blocks_each) for s in range(len(lengths))]

    def slots(s: int, start: int, end: int) -> torch.Tensor:
        return tables[s][0] * BLOCK + torch.arange(start, end)  # the sequence's blocks are consecutive

    got = [torch.empty(n, HEADS, HEAD_DIM) for n in lengths]
    for s, (q, k, v) in enumerate(seqs):
        first, last = lengths[s] // 2, lengths[s] - 1
        for start, end in ((0, first), (first, last)):  # the second chunk attends to the first through the cache
            span = PrefillSpan(0, end - start, end, tables[s])
            meta = AttentionMetadata(slots(s, start, end), 0, None, None, 0, [span])
            rows = slice(start, end)
            got[s][rows] = paged_attention(q[rows], k[rows], v[rows], cache, meta, SCALE, softcap, window)
    # both sequences' last tokens decode in one step
    meta = AttentionMetadata(
        torch.cat([slots(s, n - 1, n) for s, n in enumerate(lengths)]),
        len(lengths),
        torch.stack(tables),
        torch.tensor(lengths),
        max(lengths),
        [],
    )
    last = [torch.cat([x[n - 1 :] for x, n in zip(parts, lengths, strict=True)]) for parts in zip(*seqs, strict=True)]
    out = paged_attention(*last, cache, meta, SCALE, softcap, window)
    for s, n in enumerate(lengths):
        got[s][n - 1] = out[s]
        torch.testing.assert_close(got[s], dense(*seqs[s], softcap, window), rtol=1e-5, atol=1e-5)
