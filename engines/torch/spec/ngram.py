"""N-gram (prompt-lookup) drafting: no draft model. The last n tokens of a sequence are looked up earlier
in the same sequence (prompt and output), longest n first; the tokens that followed the latest match are
the proposal. Pays off when the answer repeats its input: editing, rewriting, summarising, code."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from engines.torch.spec.proposal import Proposal


class NgramProposer:
    def __init__(self, ngram_min: int, ngram_max: int):
        self.ngram_min = ngram_min
        self.ngram_max = ngram_max

    def propose(self, seqs, ks: list[int], make_row=None) -> list[Proposal | None]:
        return [self.lookup(seq.token_ids, k) for seq, k in zip(seqs, ks)]

    def lookup(self, token_ids: list[int], k: int) -> Proposal | None:
        tokens = np.asarray(token_ids, dtype=np.int64)
        length = len(tokens)
        for n in range(min(self.ngram_max, length - 1), self.ngram_min - 1, -1):
            # windows of tokens[:-1] start at 0 .. length-1-n: every earlier occurrence, never the suffix itself
            windows = sliding_window_view(tokens[:-1], n)
            starts = np.flatnonzero((windows == tokens[length - n :]).all(axis=1))
            if len(starts):
                follow = int(starts[-1]) + n
                return Proposal(tokens[follow : follow + k].tolist())
        return None

    def release(self, seq) -> None:  # keeps no per-sequence state
        pass

    def describe(self) -> dict:
        return {"method": "ngram", "ngram_min": self.ngram_min, "ngram_max": self.ngram_max}
