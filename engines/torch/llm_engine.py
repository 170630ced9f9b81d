"""The synchronous engine core: requests in, one `step()` at a time, `GenerationOutput` deltas out.

Not thread-safe; `AsyncTorchEngine` owns one and drives it from its step-loop thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from engines.base import (
    CompletionOutput,
    EngineStats,
    GenerationOutput,
    GenerationRequest,
    TokenLogprob,
    check_request_fits,
)
from engines.torch.block_manager import BlockManager
from engines.torch.grammar import Grammars
from engines.torch.model_runner import ModelRunner
from engines.torch.sampler import SampleRow, sample
from engines.torch.scheduler import Scheduler
from engines.torch.sequence import RequestState, Sequence, SequenceStatus
from engines.torch.spec.verify import verify


class LLMEngine:
    def __init__(
        self,
        runner: ModelRunner,
        block_manager: BlockManager,
        scheduler: Scheduler,
        eos_token_ids: list[int],
        vocab_size: int,
        max_model_len: int,
        proposer=None,
        num_speculative_tokens: int = 0,
        grammars: Callable[[], Grammars] | None = None,
    ):
        self.runner = runner
        self.bm = block_manager
        self.scheduler = scheduler
        self.eos_token_ids = list(eos_token_ids)
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.requests: dict[str, RequestState] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.num_steps = 0
        # speculative decoding (None: off): NgramProposer or DraftModelProposer
        self.proposer = proposer
        self.num_speculative_tokens = num_speculative_tokens
        self.spec_num_drafts = 0
        self.spec_draft_tokens = 0
        self.spec_accepted_tokens = 0
        # per draft position: how often a draft there was checked (every draft before it accepted), and accepted
        self.spec_checked_per_position = [0] * num_speculative_tokens
        self.spec_accepted_per_position = [0] * num_speculative_tokens
        # the chunks the current (or last) step works on, and the requests failed on their own, with the error
        self.step_chunks: list = []
        self.failed: list[tuple[str, BaseException]] = []
        # built on the first constrained request (it reads the whole vocabulary)
        self._make_grammars = grammars
        self._grammars: Grammars | None = None
        self._grammars_lock = threading.Lock()

    @property
    def grammars(self) -> Grammars:
        with self._grammars_lock:
            if self._grammars is None:
                if self._make_grammars is None:
                    raise ValueError("This engine has no tokenizer to compile structured-output constraints with.")
                self._grammars = self._make_grammars()
            return self._grammars

    def compile_grammar(self, request: GenerationRequest):
        """The request's compiled constraint (cached by constraint; thread-safe), or None without one."""
        spec = request.sampling_params.structured
        return self.grammars.compile(spec) if spec is not None else None

    # ---- requests -----------------------------------------------------------------------------
    def check_request(self, request: GenerationRequest) -> None:
        """Raise ValueError (one sentence) if the request can never be served."""
        check_request_fits(request, self.vocab_size, self.max_model_len)
        if request.request_id in self.requests:
            raise ValueError(f"Request id {request.request_id!r} is already in use.")
        self.compile_grammar(request)

    def add_request(self, request: GenerationRequest) -> None:
        self.check_request(request)
        grammar = self.compile_grammar(request)
        state = RequestState(request, grammar, self.grammars.matcher if grammar is not None else None)
        self.requests[state.request_id] = state
        self.prompt_tokens_total += state.num_prompt_tokens
        self.scheduler.add(state.seqs[0])

    def abort_request(self, request_id: str) -> GenerationOutput | None:
        """Free the request's blocks now; returns its final output (finish_reason "abort")."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        outputs = []
        for seq in state.seqs:
            if not seq.is_finished:
                self.scheduler.remove(seq)
                self._finish(seq, "abort")
                outputs.append(self._delta(seq))
        return self._output(state, outputs)

    @property
    def step_request_ids(self) -> set[str]:
        return {chunk.seq.request.request_id for chunk in self.step_chunks}

    def fail_requests(self, request_ids, exc: BaseException) -> None:
        """End these requests with `exc` (queued in `failed` for the caller) and free their blocks."""
        for request_id in request_ids:
            if self.abort_request(request_id) is not None:
                self.failed.append((request_id, exc))

    def take_failed(self) -> list[tuple[str, BaseException]]:
        failed, self.failed = self.failed, []
        return failed

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_waiting_requests(self) -> int:
        return len({s.request.request_id for s in self.scheduler.waiting})

    # ---- the step -----------------------------------------------------------------------------
    def step(self) -> list[GenerationOutput]:
        self.step_chunks = []
        if self.proposer is not None:
            self._propose()
        sched = self.scheduler.schedule()
        for victim in sched.preempted:
            self._release_draft(victim)
        self.step_chunks = sched.chunks
        if not sched.chunks:
            return []
        logits, sampling, prompt_logits = self.runner.execute(sched.chunks)
        self.num_steps += 1
        for chunk, first, rows in prompt_logits:
            self._score_prompt(chunk.seq, first, rows)
        for chunk in sched.chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens
            self.bm.register_full_blocks(chunk.seq)

        seqs, rows, row_of, speculative = [], [], [], []
        r = 0
        for chunk in sampling:
            seq = chunk.seq
            if chunk.draft_token_ids:
                speculative.append((seq, r, seq.proposal))
                r += 1 + len(chunk.draft_token_ids)
                continue
            group = [seq]
            if not seq.request.forked:  # the prompt is done: the other n-1 choices start from here
                group += self._fork(seq)
            for s in group:
                seqs.append(s)
                row_of.append(r)
                rows.append(self._sample_row(s))
            r += 1
        for chunk in sched.chunks:
            chunk.seq.proposal = None
        touched: dict[str, list[Sequence]] = {}
        if seqs:
            for seq, token, lp in self._sample(logits, seqs, rows, row_of):
                self._append(seq, [token], [lp], touched)
        if speculative:
            for (seq, _, prop), verified in zip(speculative, verify(logits, speculative, self._sample_row)):
                self.spec_num_drafts += 1
                self.spec_draft_tokens += len(prop)
                self.spec_accepted_tokens += verified.num_accepted
                for position in range(min(len(prop), verified.num_accepted + 1)):
                    self.spec_checked_per_position[position] += 1
                    self.spec_accepted_per_position[position] += position < verified.num_accepted
                self._append(seq, verified.token_ids, verified.logprobs, touched)
                if not seq.is_finished:  # accepted drafts' KV stays; the rejected ones' slots are given back
                    seq.num_computed_tokens += verified.num_accepted
                    self.bm.trim(seq)
                    self.bm.register_full_blocks(seq)
        return self._collect(touched)

    def _score_prompt(self, seq: Sequence, first: int, logits: torch.Tensor) -> None:
        """Prompt logprobs of the tokens after positions first .. first + len(logits) - 1: the raw distribution's,
        like sampled tokens' logprobs."""
        state = seq.request
        k = state.params.prompt_logprobs
        logp = torch.log_softmax(logits, dim=-1)
        targets = seq.token_ids[first + 1 : first + 1 + logits.shape[0]]
        chosen = logp.gather(1, torch.tensor(targets, device=logp.device)[:, None])
        ranks = ((logp > chosen).sum(dim=-1) + 1).tolist()
        top_vals, top_ids = logp.topk(k, dim=-1) if k else (None, None)
        for j, (token, lp, rank) in enumerate(zip(targets, chosen.squeeze(1).tolist(), ranks)):
            top = list(zip(top_ids[j].tolist(), top_vals[j].tolist())) if k else []
            state.prompt_logprobs[first + 1 + j] = TokenLogprob(token, lp, top, rank)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], rows: list[SampleRow], row_of: list[int]):
        """(seq, token, logprob) per row. Sampling depends on each request's own parameters, so when the
        batch fails, rows are sampled one at a time and only the requests whose rows fail are ended."""
        try:
            result = sample(logits[torch.tensor(row_of, device=logits.device)], rows)
            return list(zip(seqs, result.token_ids, result.logprobs))
        except Exception:  # noqa: BLE001 - narrowed down below; a row that fails alone fails its request
            pass
        sampled = []
        for seq, row, r in zip(seqs, rows, row_of):
            if seq.request.request_id not in self.requests:  # failed with an earlier row of its own
                continue
            try:
                result = sample(logits[r : r + 1], [row])
            except Exception as exc:  # noqa: BLE001 - handed to the request's caller
                self.fail_requests([seq.request.request_id], exc)
                continue
            sampled.append((seq, result.token_ids[0], result.logprobs[0]))
        return [(seq, token, lp) for seq, token, lp in sampled if seq.request.request_id in self.requests]

    def _append(self, seq: Sequence, tokens: list[int], logprobs: list, touched: dict[str, list[Sequence]]) -> None:
        """Give `seq` its new tokens in order, stopping at the first that finishes it."""
        now = time.monotonic()
        for token, lp in zip(tokens, logprobs):
            refused = seq.matcher is not None and not seq.matcher.accept_token(token)
            if refused and token not in self.eos_token_ids:  # EOS out of a dead end (grammar.fill_bitmask) just ends
                # the mask allowed only tokens the grammar accepts: this is a bug, and this request's alone
                self.fail_requests([seq.request.request_id], RuntimeError(f"token {token} broke the grammar"))
                return
            seq.token_ids.append(token)
            if lp is not None:
                seq.pending_logprobs.append(lp)
            self.generation_tokens_total += 1
            if seq.request.timings.first_token is None:
                seq.request.timings.first_token = now
            self._check_stop(seq, token)
            if seq.is_finished:
                break
        touched.setdefault(seq.request.request_id, []).append(seq)

    # ---- speculative decoding -----------------------------------------------------------------
    def _propose(self) -> None:
        """Ask the proposer for drafts for every running sequence that is decoding and speculates."""
        seqs, ks = [], []
        for seq in self.scheduler.running:
            if seq.num_uncomputed != 1 or seq.num_computed_tokens == 0 or not seq.request.speculative:
                continue
            # the step may emit k + 1 tokens; none past max_tokens or the context length
            k = min(
                self.num_speculative_tokens,
                seq.params.max_tokens - seq.num_generated - 1,
                self.max_model_len - seq.num_tokens,
            )
            if k > 0:
                seqs.append(seq)
                ks.append(k)
        if seqs:
            for seq, proposal in zip(seqs, self.proposer.propose(seqs, ks, self._sample_row)):
                seq.proposal = proposal

    def _release_draft(self, seq: Sequence) -> None:
        seq.proposal = None
        if self.proposer is not None:
            self.proposer.release(seq)

    def _fork(self, parent: Sequence) -> list[Sequence]:
        children = parent.request.fork(parent)
        for child in children:
            copy = self.bm.fork(parent, child)
            if copy is None:  # pool exhausted: the child recomputes its prompt when admitted
                self.scheduler.add(child)
                continue
            if isinstance(copy, tuple):
                self.runner.kv_cache.copy_block(*copy)
            child.status = SequenceStatus.RUNNING
            self.scheduler.running.append(child)
        return children

    def _sample_row(self, seq: Sequence, extra: list[int] = ()) -> SampleRow:
        """How `seq` samples its next token; `extra`: tokens (drafts) taken as already generated before it."""
        p = seq.params
        blocked = []
        if seq.num_generated + len(extra) < p.min_tokens:
            blocked = self.eos_token_ids + list(p.stop_token_ids)
        needs_history = p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
        return SampleRow(
            params=p,
            prompt_ids=seq.token_ids[: seq.num_prompt_tokens] if needs_history else [],
            output_ids=seq.output_token_ids + list(extra) if needs_history else [],
            generator=seq.generator,
            blocked_ids=blocked,
            grammar=(seq.matcher, list(extra)) if seq.matcher is not None else None,
        )

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        if seq.num_generated >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                seq.stop_token_id = token
                return self._finish_and_free(seq, "stop")
            if token in p.stop_token_ids:
                seq.stop_token_id = token
                return self._finish_and_free(seq, "stop")
        if seq.num_generated >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish_and_free(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._release_draft(seq)

    def _finish_and_free(self, seq: Sequence, reason: str) -> None:
        self.scheduler.remove(seq)
        self._finish(seq, reason)

    # ---- outputs ------------------------------------------------------------------------------
    def _delta(self, seq: Sequence) -> CompletionOutput:
        new = seq.output_token_ids[seq.num_emitted :]
        seq.num_emitted = seq.num_generated
        logprobs = None
        if seq.params.logprobs is not None:
            logprobs, seq.pending_logprobs = seq.pending_logprobs, []
        return CompletionOutput(
            index=seq.index,
            new_token_ids=new,
            new_logprobs=logprobs,
            num_generated=seq.num_generated,
            finish_reason=seq.finish_reason,
            stop_token_id=seq.stop_token_id,
        )

    def _output(self, state: RequestState, outputs: list[CompletionOutput]) -> GenerationOutput:
        aborted = any(s.finish_reason == "abort" for s in state.seqs)
        finished = all(s.is_finished for s in state.seqs) and (state.forked or aborted)
        if finished:
            state.timings.finished = time.monotonic()
        prompt_logprobs = None
        if state.prompt_logprobs is not None and any(s.num_generated for s in state.seqs):  # the prompt is done
            prompt_logprobs, state.prompt_logprobs = state.prompt_logprobs, None
        return GenerationOutput(
            request_id=state.request_id,
            outputs=outputs,
            num_prompt_tokens=state.num_prompt_tokens,
            num_cached_tokens=state.num_cached_tokens,
            finished=finished,
            timings=state.timings,
            prompt_logprobs=prompt_logprobs,
        )

    def _collect(self, touched: dict[str, list[Sequence]]) -> list[GenerationOutput]:
        results = []
        for request_id, seqs in touched.items():
            state = self.requests.get(request_id)
            if state is None:  # failed during this step
                continue
            out = self._output(state, [self._delta(s) for s in seqs])
            if out.finished:
                del self.requests[request_id]
            results.append(out)
        return results

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len({s.request.request_id for s in self.scheduler.running}),
            num_waiting=self.num_waiting_requests,
            kv_blocks_total=self.bm.num_blocks,
            kv_blocks_used=self.bm.num_used,
            kv_blocks_cached=self.bm.num_cached,
            prefix_cache_queries=self.bm.prefix_queries,
            prefix_cache_hits=self.bm.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.prompt_tokens_total,
            generation_tokens=self.generation_tokens_total,
            num_steps=self.num_steps,
            spec_num_drafts=self.spec_num_drafts,
            spec_draft_tokens=self.spec_draft_tokens,
            spec_accepted_tokens=self.spec_accepted_tokens,
            spec_accepted_per_position=list(self.spec_accepted_per_position),
            spec_checked_per_position=list(self.spec_checked_per_position),
        )

    def reset_counters(self) -> None:
        """Zero the monotonic counters (after the warm-up, so /metrics counts served requests only)."""
        self.prompt_tokens_total = self.generation_tokens_total = self.num_steps = 0
        self.spec_num_drafts = self.spec_draft_tokens = self.spec_accepted_tokens = 0
        self.spec_checked_per_position = [0] * self.num_speculative_tokens
        self.spec_accepted_per_position = [0] * self.num_speculative_tokens
        self.bm.prefix_queries = self.bm.prefix_hits = 0
        self.scheduler.num_preemptions = 0

    def live_sequences(self) -> list[Sequence]:
        return [s for state in self.requests.values() for s in state.seqs if not s.is_finished]
