"""Draft-model drafting: a second, cheaper model with the same tokenizer (by default the INT4 build of
the target) runs k steps ahead of each speculating sequence in its own paged KV cache.

Each sequence has a `DraftState` mirroring its tokens. Before proposing, the state keeps the longest
prefix its KV still agrees with (tokens the target rejected are rolled back and their blocks freed), then
one batched step feeds what the draft has not seen (the whole prompt the first time) and k - 1 batched
decode steps follow. Sampled requests draw drafts from the draft's own processed distribution q (same
penalties, temperature and truncation as the target) and hand q to verification.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engines.torch.block_manager import BlockManager
from engines.torch.kernels.argmax import argmax_rows
from engines.torch.model_runner import ModelRunner
from engines.torch.sampler import SampleRow, probabilities, process_logits, race
from engines.torch.scheduler import ScheduledChunk
from engines.torch.spec.proposal import Proposal


class DraftState:
    """The draft's view of one target sequence: the attributes ModelRunner and BlockManager use."""

    def __init__(self):
        self.token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0
        self.block_hashes: list[int] = []
        self.num_synced = 0  # leading tokens known to equal the target's (they never change afterwards)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens


class DraftModelProposer:
    def __init__(self, runner: ModelRunner, block_manager: BlockManager, description: dict):
        self.runner = runner
        self.bm = block_manager
        self.description = description  # what /v1/metadata says about the draft: name, source, precision
        self.states: dict[int, DraftState] = {}

    def propose(self, seqs, ks: list[int], make_row: Callable[[object, list[int]], SampleRow]) -> list[Proposal | None]:
        active = []
        for seq, k in zip(seqs, ks):
            state = self.states.setdefault(seq.seq_id, DraftState())
            self._sync(state, seq.token_ids)
            active.append((seq, state, k))
        drafts: dict[int, list[int]] = {seq.seq_id: [] for seq in seqs}
        dists: dict[int, list[torch.Tensor]] = {seq.seq_id: [] for seq in seqs}
        while active:
            fits = [self.bm.allocate(state, state.num_uncomputed) for _, state, _ in active]
            for (seq, _, _), ok in zip(active, fits):
                if not ok:  # draft pool full: this sequence goes without a proposal this step
                    self.release(seq)
            active = [entry for entry, ok in zip(active, fits) if ok]
            if not active:
                break
            chunks = [ScheduledChunk(state, state.num_uncomputed, catch_up=True) for _, state, _ in active]
            logits = self.runner.execute(chunks).logits  # every chunk reaches its state's last token
            for chunk in chunks:
                chunk.seq.num_computed_tokens += chunk.num_tokens
            rows = [make_row(seq, drafts[seq.seq_id]) for seq, _, _ in active]
            tokens, q = self._draw(logits, rows)
            still = []
            for i, (seq, state, k) in enumerate(active):
                drafts[seq.seq_id].append(tokens[i])
                if q is not None and not rows[i].params.greedy:
                    dists[seq.seq_id].append(q[i])
                state.token_ids.append(tokens[i])
                if len(drafts[seq.seq_id]) < k:
                    still.append((seq, state, k))
            active = still
        proposals = []
        for seq in seqs:
            tokens = drafts[seq.seq_id]
            probs = torch.stack(dists[seq.seq_id]) if dists[seq.seq_id] else None
            proposals.append(Proposal(tokens, probs) if tokens else None)
        return proposals

    def _draw(self, logits: torch.Tensor, rows: list[SampleRow]) -> tuple[list[int], torch.Tensor | None]:
        x = process_logits(logits, rows)
        tokens = argmax_rows(x)
        if all(row.params.greedy for row in rows):
            return tokens.tolist(), None
        q = probabilities(x, rows)
        q = q / q.sum(dim=-1, keepdim=True)
        greedy = torch.tensor([row.params.greedy for row in rows], device=x.device)
        return torch.where(greedy, tokens, race(q, rows)).tolist(), q

    def _sync(self, state: DraftState, token_ids: list[int]) -> None:
        """Keep the KV of the longest common prefix of what the draft saw and the sequence's tokens."""
        limit = min(state.num_computed_tokens, len(token_ids))
        common = min(state.num_synced, limit)
        seen = state.token_ids
        while common < limit and seen[common] == token_ids[common]:
            common += 1
        common = min(common, len(token_ids) - 1)  # at least one token is fed, so there are logits to draw from
        if state.num_computed_tokens > common:
            state.num_computed_tokens = common
            self.bm.trim(state)
        state.token_ids = list(token_ids)
        state.num_synced = len(token_ids)

    def release(self, seq) -> None:
        state = self.states.pop(seq.seq_id, None)
        if state is not None:
            self.bm.free(state)

    def live_states(self) -> list[DraftState]:
        return list(self.states.values())

    def describe(self) -> dict:
        return {"method": "draft", **self.description, "draft_kv_blocks": self.bm.num_blocks}
