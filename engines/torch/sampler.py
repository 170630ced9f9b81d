"""Batched sampling: penalties, logit bias, min_tokens, temperature, top-k, top-p, min-p, greedy, logprobs.

Sampling uses the exponential race (argmax of p / E with E ~ Exp(1)), which draws from p exactly
and lets a seeded row take its noise from its own generator while the rest share one batched draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engines.base import SamplingParams, TokenLogprob
from engines.torch.grammar import apply_bitmask, fill_bitmask
from engines.torch.kernels.argmax import argmax_rows


@dataclass
class SampleRow:
    """What the sampler needs to know about one row of logits."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None
    blocked_ids: list[int]  # EOS and stop ids while min_tokens is not yet reached
    # the sequence's grammar matcher and the tokens (drafts) to take as generated before this row, or None
    grammar: tuple[object, list[int]] | None = None


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


def sample(logits: torch.Tensor, rows: list[SampleRow]) -> SampleResult:
    """logits: [R, vocab] float32, one row per entry of `rows`."""
    x = process_logits(logits, rows)
    tokens = argmax_rows(x)
    greedy = torch.tensor([row.params.greedy for row in rows], device=logits.device)
    if not bool(greedy.all()):
        tokens = torch.where(greedy, tokens, race(probabilities(x, rows), rows))
    token_list = tokens.tolist()
    return SampleResult(token_list, token_logprobs(logits, token_list, rows))


def process_logits(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """`logits` with penalties, logit bias, min_tokens blocking and grammar masks applied (greedy takes its
    argmax): a copy, or `logits` itself when no row has any of them (callers never write into the result)."""
    bitmask = fill_bitmask([row.grammar for row in rows], logits.shape[1])
    if bitmask is None and not any(row.params.logit_bias or row.blocked_ids or _penalised(row.params) for row in rows):
        return logits
    x = logits.clone()
    if bitmask is not None:
        apply_bitmask(x, bitmask)
    _apply_penalties(x, rows)
    for i, row in enumerate(rows):
        if row.params.logit_bias:
            ids = torch.tensor(list(row.params.logit_bias.keys()), device=x.device)
            x[i, ids] += torch.tensor(list(row.params.logit_bias.values()), device=x.device, dtype=x.dtype)
        if row.blocked_ids:
            x[i, row.blocked_ids] = float("-inf")
    return x


def probabilities(x: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """The distribution a sampled row draws from: softmax(x / temperature) cut to top-k, top-p and min-p
    (not renormalised: `race` and speculative verification only need ratios)."""
    temps = torch.tensor([1.0 if row.params.greedy else row.params.temperature for row in rows], device=x.device)
    return _truncate(torch.softmax(x / temps[:, None], dim=-1), rows)


def race(weights: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """One draw per row from the (unnormalised) weights: argmax of w / E with E ~ Exp(1); a row with a
    generator takes its noise from it."""
    noise = torch.empty_like(weights)
    noise.exponential_()
    for i, row in enumerate(rows):
        if row.generator is not None:
            noise[i] = torch.empty(weights.shape[1]).exponential_(generator=row.generator).to(weights.device)
    return (weights / noise).argmax(dim=-1)


def _penalised(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or bool(params.presence_penalty) or bool(params.frequency_penalty)


def _apply_penalties(x: torch.Tensor, rows: list[SampleRow]) -> None:
    idx = [i for i, row in enumerate(rows) if _penalised(row.params)]
    if not idx:
        return
    vocab = x.shape[1]
    device = x.device
    for i in idx:  # rows with penalties are the exception; keep the common path free of [R, vocab] work
        p = rows[i].params
        counts = torch.bincount(torch.tensor(rows[i].output_ids, dtype=torch.long, device=device), minlength=vocab).to(
            x.dtype
        )
        if p.repetition_penalty != 1.0:
            seen = counts > 0
            if rows[i].prompt_ids:
                seen[torch.tensor(rows[i].prompt_ids, device=device)] = True
            penalised = torch.where(x[i] > 0, x[i] / p.repetition_penalty, x[i] * p.repetition_penalty)
            x[i] = torch.where(seen, penalised, x[i])
        x[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(x.dtype)


def _truncate(probs: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Zero out tokens outside each row's top-k, top-p nucleus and min-p floor (the most likely
    token always survives)."""
    device = probs.device
    vocab = probs.shape[1]
    top_k = torch.tensor([row.params.effective_top_k(vocab) for row in rows], device=device)
    top_p = torch.tensor([row.params.top_p for row in rows], device=device)
    min_p = torch.tensor([row.params.min_p for row in rows], device=device)
    if bool((min_p > 0).any()):
        floor = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
        probs = probs.masked_fill(probs < floor, 0.0)
    need_k = bool((top_k < vocab).any())
    need_p = bool((top_p < 1.0).any())
    if not (need_k or need_p):
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)[None, :]
    drop = ranks >= top_k[:, None]
    if need_p:
        kept = sorted_probs.masked_fill(drop, 0.0)
        kept = kept / kept.sum(dim=-1, keepdim=True)
        before = kept.cumsum(dim=-1) - kept  # mass strictly before each token
        drop |= before >= top_p[:, None]
    drop[:, 0] = False
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs)


def token_logprobs(raw: torch.Tensor, tokens: list[int], rows: list[SampleRow]) -> list[TokenLogprob | None]:
    wanted = [row.params.logprobs for row in rows]
    if all(w is None for w in wanted):
        return [None] * len(rows)
    logp = torch.log_softmax(raw, dim=-1)
    k = max(w for w in wanted if w is not None)
    chosen = logp.gather(1, torch.tensor(tokens, device=raw.device)[:, None]).squeeze(1).tolist()
    top_vals, top_ids = logp.topk(k, dim=-1) if k else (None, None)
    results: list[TokenLogprob | None] = []
    for i, w in enumerate(wanted):
        if w is None:
            results.append(None)
            continue
        top = list(zip(top_ids[i, :w].tolist(), top_vals[i, :w].tolist())) if w else []
        results.append(TokenLogprob(tokens[i], chosen[i], top))
    return results
