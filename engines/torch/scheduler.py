"""In-flight batching: each step packs running sequences' decodes and (chunked) prefills, then admits
waiting sequences, under a token budget and a sequence cap. When blocks run out, the newest running
sequence is preempted (its blocks freed; it is recomputed later from its tokens)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engines.config import MAX_SPECULATIVE_TOKENS
from engines.torch.block_manager import BlockManager
from engines.torch.sequence import Sequence, SequenceStatus

MAX_DECODE_ROWS = MAX_SPECULATIVE_TOKENS + 1  # a verification: k drafts after the last accepted token


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens computed for this sequence in this step (1 for a decode)
    draft_token_ids: list[int] = field(default_factory=list)  # speculative tokens scored after them
    catch_up: bool = False  # a draft model feeding the few tokens its target accepted since its last step

    @property
    def num_query_tokens(self) -> int:
        return self.num_tokens + len(self.draft_token_ids)

    @property
    def runs_as_decode_rows(self) -> bool:
        """Decodes, verifications of k + 1 tokens and a draft's catch-up run as one decode row per token
        (row j attends to the first start + j + 1 tokens): one paged-attention op for the whole batch and
        the numerics of a plain decode. Prompt chunks keep SDPA, so a prefix-cache hit computes the rest
        of a prompt exactly as a full prefill does."""
        if self.seq.num_computed_tokens == 0:
            return False
        return self.num_query_tokens == 1 or (
            (bool(self.draft_token_ids) or self.catch_up) and self.num_query_tokens <= MAX_DECODE_ROWS
        )

    def prompt_logprob_positions(self) -> tuple[int, int]:
        """(first position, count) of this chunk's positions whose logits score a later prompt token, when the
        request still waits for its prompt logprobs; count 0 otherwise."""
        state = getattr(self.seq, "request", None)  # a draft model's DraftState has none
        if state is None or state.prompt_logprobs is None or self.seq.index != 0:
            return 0, 0
        first = self.seq.num_computed_tokens
        last = min(first + self.num_tokens, self.seq.num_prompt_tokens - 1)  # the last prompt token scores nothing
        return first, max(0, last - first)

    @property
    def completes(self) -> bool:
        """True when this chunk reaches the sequence's last token, so the step samples for it."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_query_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free(seq)
        seq.proposal = None
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled: list[Sequence] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            if seq.proposal is not None:  # speculative tokens ride along while the budget allows
                seq.proposal = seq.proposal.truncated(budget - n) if n == seq.num_uncomputed else None
            while not self.bm.allocate(seq, n + len(seq.proposal or ())):
                if seq.proposal is not None:  # short of blocks: drop the drafts before preempting anyone
                    seq.proposal = None
                    continue
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                drafts = seq.proposal.token_ids if seq.proposal is not None else []
                out.chunks.append(ScheduledChunk(seq, n, drafts))
                scheduled.append(seq)
                budget -= n + len(drafts)
                i += 1
                continue
            break  # `seq` preempted itself: it was the newest, nothing after it remains

        # Admit waiting sequences only when nothing had to be preempted this step.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            hits = self.bm.match_prefix(seq)
            n = min(seq.num_tokens - len(hits) * self.bm.block_size, budget)
            if not self.bm.allocate_with_prefix(seq, hits, n):
                break
            self.waiting.popleft()
            if seq.index == 0 and seq.request.timings.first_scheduled is None:  # first admission only
                self.bm.record_prefix_lookup(seq.num_tokens, seq.num_computed_tokens)
                seq.request.num_cached_tokens = seq.num_computed_tokens
            seq.status = SequenceStatus.RUNNING
            seq.request.mark_scheduled()
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, n))
            budget -= n
        return out
