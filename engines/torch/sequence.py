"""Request state: a `RequestState` owns one `Sequence` per choice (n > 1 forks them after the prompt)."""

from __future__ import annotations

import enum
import itertools
import time

import torch

from engines.base import FinishReason, GenerationRequest, RequestTimings, SamplingParams, TokenLogprob
from engines.torch.spec.proposal import Proposal

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One choice: its tokens (prompt + generated), how many have KV in the cache, and its blocks."""

    def __init__(self, request: RequestState, index: int, token_ids: list[int], generator: torch.Generator | None):
        self.seq_id = next(_seq_ids)
        self.request = request
        self.index = index
        self.token_ids = token_ids
        self.num_prompt_tokens = request.num_prompt_tokens
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0  # leading full blocks already registered in the prefix cache
        self.block_hashes: list[int] = []
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.stop_token_id: int | None = None
        self.generator = generator
        self.num_emitted = 0  # generated tokens already handed to the caller
        self.pending_logprobs: list[TokenLogprob] = []
        self.proposal: Proposal | None = None  # speculative tokens to verify in the next step
        # the grammar's state after this choice's generated tokens (None: unconstrained)
        self.matcher = request.new_matcher()

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request.request_id}#{self.index}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens})"
        )


class RequestState:
    def __init__(self, request: GenerationRequest, grammar=None, make_matcher=None):
        """`grammar`: the compiled constraint of the request, and `make_matcher` makes a matcher of it per choice."""
        self.grammar = grammar
        self._make_matcher = make_matcher
        self.request_id = request.request_id
        self.params = request.sampling_params
        self.speculative = request.speculative
        self.prompt_token_ids = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.timings = RequestTimings(arrival=request.arrival_time)
        self.num_cached_tokens = 0
        first = Sequence(self, 0, list(self.prompt_token_ids), self.make_generator(0))
        self.seqs: list[Sequence] = [first]
        self.forked = self.params.n == 1
        # per prompt position, filled as its chunk is computed (again, identically, after a preemption) and
        # handed out with the first output; None once handed out or when not asked for
        self.prompt_logprobs: list[TokenLogprob | None] | None = (
            [None] * self.num_prompt_tokens if self.params.prompt_logprobs is not None else None
        )

    def new_matcher(self):
        return self._make_matcher(self.grammar) if self.grammar is not None else None

    def make_generator(self, index: int) -> torch.Generator | None:
        """Seeded requests sample from their own generator per choice, so what else shares the
        batch cannot change their draws."""
        if self.params.seed is None or self.params.greedy:
            return None
        g = torch.Generator()
        g.manual_seed((self.params.seed + index) % (1 << 63))
        return g

    def fork(self, parent: Sequence) -> list[Sequence]:
        """Create the other n-1 choices from the prompt's sequence once its prefill is done."""
        children = []
        for index in range(1, self.params.n):
            child = Sequence(self, index, list(parent.token_ids), self.make_generator(index))
            children.append(child)
        self.seqs.extend(children)
        self.forked = True
        return children

    @property
    def is_finished(self) -> bool:
        return self.forked and all(s.is_finished for s in self.seqs)

    def mark_scheduled(self) -> None:
        if self.timings.first_scheduled is None:
            self.timings.first_scheduled = time.monotonic()
