"""Accuracy of a built model against the unquantized one on the held-out prompts.

The reference (unquantized float32) model first answers each held-out prompt greedily; then both
models read prompt + answer in one pass, and at every answer position we compare their next-token
distributions:
- mean KL(P_ref || P_test) in nats;
- top-1 agreement: how often both models' most likely next token is the same;
- perplexity of the reference's own answers under each model (the reference's is the floor).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from engines.base import GenerationRequest, SamplingParams
from engines.torch.llm_engine import LLMEngine
from engines.torch.sequence_runner import SequenceRunner


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


def greedy_answers(core: LLMEngine, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """The reference engine's greedy answers (stopping at EOS or max_new_tokens), all in one batch."""
    answers: dict[str, list[int]] = {}
    for i, ids in enumerate(prompts):
        core.add_request(
            GenerationRequest(f"eval-{i}", ids, SamplingParams(temperature=0.0, max_tokens=max_new_tokens))
        )
        answers[f"eval-{i}"] = []
    while core.has_work():
        for out in core.step():
            for choice in out.outputs:
                answers[out.request_id].extend(choice.new_token_ids)
    return [answers[f"eval-{i}"] for i in range(len(prompts))]


@torch.inference_mode()
def compare(
    reference: SequenceRunner,
    test: SequenceRunner,
    prompts: list[list[int]],
    answers: list[list[int]],
    progress: bool = True,
    desc: str = "evaluate",
) -> Accuracy:
    kl_sum = nll_sum = ref_nll_sum = 0.0
    agree = positions = 0
    for prompt, answer in tqdm(list(zip(prompts, answers)), desc=desc, unit="prompt", disable=not progress):
        if not answer:
            continue
        seq = prompt + answer
        start, end = len(prompt) - 1, len(seq) - 1  # positions whose next token is an answer token
        ref = F.log_softmax(reference.logits(seq, start, end), dim=-1)  # [A, vocab]
        got = F.log_softmax(test.logits(seq, start, end).to(ref.device), dim=-1)
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
        prompts=len(prompts),
        positions=positions,
    )
