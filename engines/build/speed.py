"""Decode throughput of a built model at a given concurrency, for the build report.

Random prompts (distinct, so prefix caching cannot help) of PROMPT_TOKENS tokens, NEW_TOKENS
greedy tokens each with EOS ignored, all submitted at once. decode tok/s counts the tokens after
each request's first one over the time after the last prefill finished: the rate of steady decoding.
"""

from __future__ import annotations

import time

import torch

from engines.base import GenerationRequest, SamplingParams
from engines.torch.llm_engine import LLMEngine

PROMPT_TOKENS = 32
NEW_TOKENS = 64


def decode_speed(
    core: LLMEngine, concurrency: int, vocab_size: int, new_tokens: int = NEW_TOKENS, seed: int = 0
) -> dict:
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for i in range(concurrency):
        ids = torch.randint(100, vocab_size, (PROMPT_TOKENS,), generator=g).tolist()
        core.add_request(GenerationRequest(f"speed-{i}", ids, params))
    started = time.perf_counter()
    first: dict[str, float] = {}
    later: list[tuple[float, int]] = []  # (time, tokens) of every non-first token batch
    total = 0
    while core.has_work():
        for out in core.step():
            now = time.perf_counter()
            n = sum(len(c.new_token_ids) for c in out.outputs)
            total += n
            if out.request_id not in first and n:
                first[out.request_id] = now
                n -= 1
            later.append((now, n))
    ended = time.perf_counter()
    decode_start = max(first.values())
    decoded = sum(n for t, n in later if t > decode_start)
    return {
        "concurrency": concurrency,
        "output_tok_s": round(total / (ended - started), 1),
        "decode_tok_s": round(decoded / (ended - decode_start), 1) if decoded else None,
    }
