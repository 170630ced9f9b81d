"""Accuracy of a built model against the unquantized one on the held-out prompts.

The reference (unquantized float32) model first answers each held-out prompt greedily; then both
models read prompt + answer, and at every answer position we compare their next-token distributions:
- mean KL(P_ref || P_test) in nats;
- top-1 agreement: how often both models' most likely next token is the same;
- perplexity of the reference's own answers under each model (the reference's is the floor).

Both models run a layer at a time (engines/build/stream.py), so the float model is never held whole. Its greedy
answers (engines/build/greedy.py) are cached by model and prompts (builder._reference_answers), so a model pays for
them once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from engines.torch.models.protocol import CausalLM


@dataclass
class Accuracy:
    kl_mean: float
    top1_agreement: float  # fraction in [0, 1]
    perplexity: float
    reference_perplexity: float
    prompts: int
    positions: int

    def to_dict(self) -> dict:
        return asdict(self)


def answer_rows(prompts: list[list[int]], answers: list[list[int]]) -> list[slice]:
    """In each prompt + answer, the positions whose next token is an answer token."""
    return [slice(len(p) - 1, len(p) + len(a) - 1) for p, a in zip(prompts, answers)]


@torch.inference_mode()
def compare(
    reference: CausalLM,
    reference_hidden: list[torch.Tensor],
    test: CausalLM,
    test_hidden: list[torch.Tensor],
    answers: list[list[int]],
) -> Accuracy:
    """Both models' final hidden states at each prompt's answer rows (answer_rows) -> the accuracy figures; each
    model's compute_logits makes its next-token distributions."""
    kl_sum = nll_sum = ref_nll_sum = 0.0
    agree = positions = 0
    for ref_h, test_h, answer in zip(reference_hidden, test_hidden, answers):
        if not answer:
            continue
        ref = F.log_softmax(reference.compute_logits(ref_h), dim=-1)  # [A, vocab]
        got = F.log_softmax(test.compute_logits(test_h).to(ref.device), dim=-1)
        target = torch.tensor(answer, device=ref.device)[:, None]
        kl_sum += float((ref.exp() * (ref - got)).sum())
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        nll_sum -= float(got.gather(1, target).sum())
        ref_nll_sum -= float(ref.gather(1, target).sum())
        positions += len(answer)
    if positions == 0:
        raise ValueError("the reference model answered every held-out prompt with nothing; nothing to compare")
    return Accuracy(
        kl_mean=kl_sum / positions,
        top1_agreement=agree / positions,
        perplexity=math.exp(nll_sum / positions),
        reference_perplexity=math.exp(ref_nll_sum / positions),
        prompts=len(reference_hidden),
        positions=positions,
    )
