"""What a proposer hands the scheduler for one sequence."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Proposal:
    token_ids: list[int]
    # [k, vocab] the normalised distribution each draft token was drawn from; None when the proposer is
    # deterministic (n-gram lookup, greedy drafting): the draft then counts as a point mass.
    probs: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    def truncated(self, k: int) -> Proposal | None:
        """The first k tokens (None for k = 0): the scheduler trims a proposal to its token budget."""
        if k <= 0:
            return None
        if k >= len(self.token_ids):
            return self
        return Proposal(self.token_ids[:k], None if self.probs is None else self.probs[:k])
