"""Exact verification of proposals against the target's logits at the k + 1 positions a step scored.

Greedy rows keep drafts while they equal the target's argmax and then take the target's own token, so
the output is the one greedy decoding without speculation gives. Sampled rows use speculative sampling
(Leviathan et al. 2023; Chen et al. 2023): draft d with draft probability q(d) is accepted with
probability min(1, p(d) / q(d)); at the first rejection the token is drawn from norm(max(0, p - q)); when
every draft is accepted a bonus token is drawn from p at the last position. Each emitted token is then
distributed exactly as the target's sampler (penalties, bias, temperature, top-k/top-p/min-p included)
would have drawn it. A deterministic proposer's draft is a point mass: q = one_hot(d).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engines.base import TokenLogprob
from engines.torch.kernels.argmax import argmax_rows
from engines.torch.sampler import SampleRow, probabilities, process_logits, token_logprobs
from engines.torch.spec.proposal import Proposal


@dataclass
class Verified:
    token_ids: list[int]  # accepted drafts, then one token of the target's own
    logprobs: list[TokenLogprob | None]
    num_accepted: int  # drafts accepted (len(token_ids) - 1)


def verify(
    logits: torch.Tensor,  # [R, vocab] float32 raw target logits
    items: list[tuple[object, int, Proposal]],  # (sequence, first logits row, proposal): rows start .. start + k
    make_row: Callable[[object, list[int]], SampleRow],  # the sequence's SampleRow after extra output tokens
) -> list[Verified]:
    rows: list[SampleRow] = []
    index: list[int] = []
    for seq, start, prop in items:
        for j in range(len(prop) + 1):  # position j sees the drafts before it as already generated
            rows.append(make_row(seq, prop.token_ids[:j]))
            index.append(start + j)
    raw = logits[torch.tensor(index, device=logits.device)]
    x = process_logits(raw, rows)
    argmax = argmax_rows(x).tolist()
    probs = probabilities(x, rows) if not all(r.params.greedy for r in rows) else None

    results, emitted_rows, emitted_tokens = [], [], []
    offset = 0
    for _seq, _, prop in items:
        k = len(prop)
        if rows[offset].params.greedy:
            tokens = _accept_greedy(argmax[offset : offset + k + 1], prop.token_ids)
        else:
            tokens = _accept_sampled(probs[offset : offset + k + 1], prop, rows[offset].generator)
        emitted_rows.extend(range(offset, offset + len(tokens)))
        emitted_tokens.extend(tokens)
        results.append(Verified(tokens, [], len(tokens) - 1))
        offset += k + 1

    logprobs = token_logprobs(raw[emitted_rows], emitted_tokens, [rows[i] for i in emitted_rows])
    position = 0
    for result in results:
        result.logprobs = logprobs[position : position + len(result.token_ids)]
        position += len(result.token_ids)
    return results


def _accept_greedy(target: list[int], drafts: list[int]) -> list[int]:
    tokens = []
    for j, token in enumerate(target):
        tokens.append(token)
        if j == len(drafts) or token != drafts[j]:
            break
    return tokens


def _accept_sampled(weights: torch.Tensor, prop: Proposal, generator: torch.Generator | None) -> list[int]:
    p = weights / weights.sum(dim=-1, keepdim=True)  # [k + 1, vocab]
    tokens = []
    for j, draft in enumerate(prop.token_ids):
        q_draft = 1.0 if prop.probs is None else float(prop.probs[j, draft])
        u = float(torch.rand((), generator=generator))
        if u * q_draft < float(p[j, draft]):  # u < p / q without dividing by a tiny q
            tokens.append(draft)
            continue
        if prop.probs is None:
            residual = p[j].clone()
            residual[draft] = 0.0
        else:
            residual = (p[j] - prop.probs[j].to(p.device)).clamp_(min=0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: the residual is empty, p itself is right
            residual = p[j]
        tokens.append(_draw(residual, generator))
        return tokens
    tokens.append(_draw(p[len(prop.token_ids)], generator))
    return tokens


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """One draw from unnormalised weights (the exponential race the sampler uses)."""
    noise = torch.empty(weights.shape[0]).exponential_(generator=generator).to(weights.device)
    return int((weights / noise).argmax())
