"""The synchronous engine core: requests in, one `step()` at a time, `GenerationOutput` deltas out.

Not thread-safe; `AsyncTorchEngine` owns one and drives it from its step-loop thread.
"""

from __future__ import annotations

import time

import torch

from engines.base import CompletionOutput, EngineStats, GenerationOutput, GenerationRequest
from engines.torch.block_manager import BlockManager
from engines.torch.model_runner import ModelRunner
from engines.torch.sampler import SampleRow, sample
from engines.torch.scheduler import Scheduler
from engines.torch.sequence import RequestState, Sequence, SequenceStatus


class LLMEngine:
    def __init__(
        self,
        runner: ModelRunner,
        block_manager: BlockManager,
        scheduler: Scheduler,
        eos_token_ids: list[int],
        vocab_size: int,
        max_model_len: int,
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

    # ---- requests -----------------------------------------------------------------------------
    def check_request(self, request: GenerationRequest) -> None:
        """Raise ValueError (one sentence) if the request can never be served."""
        params = request.sampling_params
        params.validate(self.vocab_size)
        n_prompt = len(request.prompt_token_ids)
        if n_prompt == 0:
            raise ValueError("The prompt is empty; it must contain at least one token.")
        if any(not 0 <= t < self.vocab_size for t in request.prompt_token_ids):
            raise ValueError(f"The prompt contains token ids outside the vocabulary (0..{self.vocab_size - 1}).")
        if n_prompt + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{n_prompt + params.max_tokens} tokens ({n_prompt} in the prompt, {params.max_tokens} in the completion). "
                "Please reduce the length of the prompt or completion."
            )
        if request.request_id in self.requests:
            raise ValueError(f"Request id {request.request_id!r} is already in use.")

    def add_request(self, request: GenerationRequest) -> None:
        self.check_request(request)
        state = RequestState(request)
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

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_waiting_requests(self) -> int:
        return len({s.request.request_id for s in self.scheduler.waiting})

    # ---- the step -----------------------------------------------------------------------------
    def step(self) -> list[GenerationOutput]:
        sched = self.scheduler.schedule()
        if not sched.chunks:
            return []
        logits, sampling = self.runner.execute(sched.chunks)
        self.num_steps += 1
        for chunk in sched.chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens
            self.bm.register_full_blocks(chunk.seq)

        seqs, rows, row_of = [], [], []
        for r, chunk in enumerate(sampling):
            seq = chunk.seq
            state = seq.request
            group = [seq]
            if not state.forked:  # the prompt is done: the other n-1 choices start from here
                group += self._fork(seq)
            for s in group:
                seqs.append(s)
                row_of.append(r)
                rows.append(self._sample_row(s))
        touched: dict[str, list[Sequence]] = {}
        if seqs:
            result = sample(logits[torch.tensor(row_of, device=logits.device)], rows)
            now = time.monotonic()
            for seq, token, lp in zip(seqs, result.token_ids, result.logprobs):
                seq.token_ids.append(token)
                if lp is not None:
                    seq.pending_logprobs.append(lp)
                self.generation_tokens_total += 1
                if seq.request.timings.first_token is None:
                    seq.request.timings.first_token = now
                self._check_stop(seq, token)
                touched.setdefault(seq.request.request_id, []).append(seq)
        return self._collect(touched)

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

    def _sample_row(self, seq: Sequence) -> SampleRow:
        p = seq.params
        blocked = []
        if seq.num_generated < p.min_tokens:
            blocked = self.eos_token_ids + list(p.stop_token_ids)
        needs_history = p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
        return SampleRow(
            params=p,
            prompt_ids=seq.token_ids[: seq.num_prompt_tokens] if needs_history else [],
            output_ids=seq.output_token_ids if needs_history else [],
            generator=seq.generator,
            blocked_ids=blocked,
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
        return GenerationOutput(
            request_id=state.request_id,
            outputs=outputs,
            num_prompt_tokens=state.num_prompt_tokens,
            num_cached_tokens=state.num_cached_tokens,
            finished=finished,
            timings=state.timings,
        )

    def _collect(self, touched: dict[str, list[Sequence]]) -> list[GenerationOutput]:
        results = []
        for request_id, seqs in touched.items():
            state = self.requests[request_id]
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
        )

    def live_sequences(self) -> list[Sequence]:
        return [s for state in self.requests.values() for s in state.seqs if not s.is_finished]
