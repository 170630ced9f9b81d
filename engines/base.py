"""The engine interface both backends implement (torch and trtllm).

The server talks only to `Engine`: it tokenizes, builds a `GenerationRequest`, iterates the async
stream of `GenerationOutput` that `generate()` yields, and detokenizes. Stop *strings* are the
server's job (they need text); stop *token ids*, EOS, max_tokens and the context limit are the
engine's.
"""

from __future__ import annotations

import abc
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "abort"]

MAX_TOP_LOGPROBS = 20
MAX_N = 128
# Temperatures below this sample greedily (vLLM's epsilon): dividing logits by a tiny temperature overflows
# them to inf and the softmax to NaN.
MIN_SAMPLING_TEMPERATURE = 1e-5
# Seeds are whatever fits in 64 bits, signed or not (what torch.Generator.manual_seed takes).
SEED_RANGE = (-(2**63), 2**64 - 1)


class EngineError(RuntimeError):
    """Base class of errors the engine reports to callers."""


class EngineDeadError(EngineError):
    """The step loop has died; no request can be served any more."""


class EngineOverloadedError(EngineError):
    """The waiting queue is full; the caller should retry later (HTTP 429)."""


class RequestFailedError(EngineError):
    """The engine failed while serving this one request; it goes on serving the others (HTTP 500)."""


class RequestError(ValueError):
    """A request the engine will not serve as given: the client's error (HTTP 400).

    `param` names the field at fault as the OpenAI/vLLM request body names it (SamplingParams' fields carry those
    names; the server keeps it only when the body it is answering has that field), `code` is OpenAI's
    machine-readable code. A ValueError, so that callers written against the plain ValueError this contract
    used to name keep working."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidValueError(RequestError):
    """A field's value is out of range or malformed (a temperature of 3, a token id outside the vocabulary)."""


class UnsupportedRequestError(RequestError):
    """Valid values this engine cannot honour together (ignore_eos with a structured output), or a feature it
    does not have."""


class ContextLengthExceededError(InvalidValueError):
    """The prompt plus the tokens asked for are longer than the model's context."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message, param, code="context_length_exceeded")


StructuredKind = Literal["json", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on what a request may generate; hashable, so compiled grammars are cached by it.

    - json: `value` is a JSON schema as JSON text (the client's property order kept: it is the output's);
    - json_object: any JSON object (`value` is "");
    - regex: `value` is a regular expression the whole output matches;
    - choice: the output is exactly one of `choices`;
    - grammar: `value` is an EBNF grammar (xgrammar's / llama.cpp's GBNF dialect, or Lark) whose root rule
      derives the whole output.
    The output ends once the constraint is complete: the engine then allows only EOS (or stop tokens).
    """

    kind: StructuredKind
    value: str = ""
    choices: tuple[str, ...] = ()


@dataclass
class SamplingParams:
    """Per-request decoding settings, with vLLM's meaning for each field.

    temperature 0 is greedy. top_k 0 or -1 disables top-k. logprobs None returns none; an int k
    returns the chosen token's logprob plus the k most likely alternatives (k <= 20). Logprobs are
    those of the model's raw distribution (before penalties, bias and temperature), like vLLM's.
    A seed makes the request's samples reproducible whatever else shares the batch.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None
    # logprobs of the prompt's tokens (each given the tokens before it) and this many alternatives; None: none
    prompt_logprobs: int | None = None
    structured: StructuredOutput | None = None

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise InvalidValueError (or UnsupportedRequestError) with one readable sentence for the first invalid
        field, naming it as `param`."""
        if not 1 <= self.n <= MAX_N:
            raise InvalidValueError(f"n must be between 1 and {MAX_N}, got {self.n}.", "n")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidValueError(f"temperature must be between 0 and 2, got {self.temperature}.", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidValueError(f"top_p must be in (0, 1], got {self.top_p}.", "top_p")
        if self.top_k < -1:
            raise InvalidValueError(
                f"top_k must be -1 (disabled), 0 (disabled) or positive, got {self.top_k}.", "top_k"
            )
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise InvalidValueError(
                f"seed must be a 64-bit integer ({SEED_RANGE[0]}..{SEED_RANGE[1]}), got {self.seed}.", "seed"
            )
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidValueError(f"min_p must be between 0 and 1, got {self.min_p}.", "min_p")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise InvalidValueError(f"{name} must be between -2 and 2, got {value}.", name)
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise InvalidValueError(
                f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}.", "repetition_penalty"
            )
        if self.max_tokens < 1:
            raise InvalidValueError(f"max_tokens must be at least 1, got {self.max_tokens}.", "max_tokens")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidValueError(
                f"min_tokens must be between 0 and max_tokens ({self.max_tokens}), got {self.min_tokens}.", "min_tokens"
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidValueError(
                f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.logprobs}.", "top_logprobs"
            )
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidValueError(
                f"prompt_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.prompt_logprobs}.",
                "prompt_logprobs",
            )
        for token_id, bias in self.logit_bias.items():
            if vocab_size is not None and not 0 <= token_id < vocab_size:
                raise InvalidValueError(
                    f"logit_bias token id {token_id} is outside the vocabulary (0..{vocab_size - 1}).", "logit_bias"
                )
            if not -100.0 <= bias <= 100.0:
                raise InvalidValueError(f"logit_bias values must be between -100 and 100, got {bias}.", "logit_bias")
        for token_id in self.stop_token_ids:
            if vocab_size is not None and not 0 <= token_id < vocab_size:
                raise InvalidValueError(
                    f"stop token id {token_id} is outside the vocabulary (0..{vocab_size - 1}).", "stop_token_ids"
                )
        if self.structured is not None:
            # the grammar ends the output with EOS; neither setting could be honoured without breaking it
            if self.ignore_eos:
                raise UnsupportedRequestError(
                    "ignore_eos cannot be combined with a structured output: the output "
                    "ends where the grammar is complete.",
                    "ignore_eos",
                )
            if self.min_tokens:
                raise UnsupportedRequestError(
                    "min_tokens cannot be combined with a structured output: the output "
                    "ends where the grammar is complete.",
                    "min_tokens",
                )

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_SAMPLING_TEMPERATURE

    def effective_top_k(self, vocab_size: int) -> int:
        """top_k as a count of tokens to keep, vocab_size when disabled or larger than the vocabulary
        (any int passes validation; a huge one must not reach a tensor)."""
        return self.top_k if 0 < self.top_k < vocab_size else vocab_size


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    speculative: bool = True  # False opts this request out of speculative decoding (when the engine has it)


def check_request_fits(request: GenerationRequest, vocab_size: int, max_model_len: int) -> None:
    """Raise a RequestError (one sentence) when a request's parameters, prompt or length can never be served.

    The prompt's errors name no `param`: the engine does not know whether the client sent a prompt or messages."""
    params = request.sampling_params
    params.validate(vocab_size)
    n_prompt = len(request.prompt_token_ids)
    if n_prompt == 0:
        raise InvalidValueError("The prompt is empty; it must contain at least one token.")
    if any(not 0 <= t < vocab_size for t in request.prompt_token_ids):
        raise InvalidValueError(f"The prompt contains token ids outside the vocabulary (0..{vocab_size - 1}).")
    if max_model_len and n_prompt + params.max_tokens > max_model_len:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{n_prompt + params.max_tokens} tokens ({n_prompt} in the prompt, {params.max_tokens} in the completion). "
            "Please reduce the length of the prompt or completion."
        )


@dataclass
class TokenLogprob:
    """The chosen token's logprob and the top alternatives (token id, logprob), most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    rank: int | None = None  # 1 + how many tokens were likelier (prompt logprobs report it, as vLLM's do)


@dataclass
class CompletionOutput:
    """One choice's progress since the previous `GenerationOutput` (a delta) plus its totals."""

    index: int
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None
    num_generated: int
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None


@dataclass
class RequestTimings:
    """Monotonic timestamps (time.monotonic) of a request's life, for latency metrics."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None


@dataclass
class GenerationOutput:
    """What one engine step produced for one request: a delta per choice that advanced."""

    request_id: str
    outputs: list[CompletionOutput]
    num_prompt_tokens: int
    num_cached_tokens: int
    finished: bool
    timings: RequestTimings
    # with SamplingParams.prompt_logprobs, on the request's first output: one entry per prompt token, None for
    # the first (nothing precedes it)
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class EngineStats:
    """Point-in-time gauges and monotonically increasing counters for /metrics."""

    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    kv_blocks_cached: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_steps: int = 0
    # speculative decoding: verification steps that had drafts, draft tokens proposed, of which accepted
    spec_num_drafts: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    # per draft position 0, 1, ...: drafts checked there (all drafts before them accepted), of which accepted
    spec_checked_per_position: list[int] = field(default_factory=list)
    spec_accepted_per_position: list[int] = field(default_factory=list)

    @property
    def spec_acceptance_rate(self) -> float:
        return self.spec_accepted_tokens / self.spec_draft_tokens if self.spec_draft_tokens else 0.0

    @property
    def spec_alpha(self) -> float:
        """Per-token acceptance probability α estimated as accepted / checked draft positions: the maximum-
        likelihood estimate when each draft is accepted with probability α until the first rejection."""
        checked = sum(self.spec_checked_per_position)
        return sum(self.spec_accepted_per_position) / checked if checked else 0.0

    @property
    def spec_mean_accepted_length(self) -> float:
        """Draft tokens accepted per verification step (each step also emits one token of the target's own)."""
        return self.spec_accepted_tokens / self.spec_num_drafts if self.spec_num_drafts else 0.0

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass(frozen=True)
class BuiltEngine:
    """The engine directory being served, as its manifest (engine.json) describes it."""

    precision: str
    kv_cache_dtype: str
    created: str | None
    kiln_version: str | None
    built_for: str | None  # the hardware it was built on (Hardware.describe())
    # torch builds only (None for TensorRT-LLM engines)
    profile: str | None = None
    weight_formats: dict[str, str] | None = None
    build_hash: str | None = None


@dataclass(frozen=True)
class SpeculationInfo:
    """How an engine decodes speculatively: the method, the draft length, and the proposer's own facts (the
    n-gram sizes, the draft model and its KV blocks...)."""

    method: str
    num_speculative_tokens: int
    proposer: dict[str, Any] = field(default_factory=dict)


@dataclass
class EngineDetails:
    """What an engine reports beyond EngineInfo's core fields, for /v1/metadata and /metrics. A field a backend
    does not know stays None (or empty) and is left out of /v1/metadata's `extra`."""

    # of a built engine, or what a model folder was quantized to at load; None: dense, at EngineInfo.dtype
    precision: str | None = None
    profile: str | None = None  # the build profile that chose the precision
    hardware: str | None = None  # this machine, described; None: EngineInfo.device
    speculative: SpeculationInfo | None = None  # None: speculative decoding is off
    versions: dict[str, str] = field(default_factory=dict)  # the backend's libraries (tensorrt_llm), by package
    engine: BuiltEngine | None = None  # None: a model folder, not an engine directory
    architecture: str | None = None  # the model's model_type
    model_source: str | None = None  # the folder, engine directory or Hub id served
    prefix_caching: bool | None = None
    scheduler_policy: str | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    torch_threads: int | None = None
    # the implementation each CPU kernel op runs (engines/torch/kernels/dispatch.py): an ISA level, "x86-64" or
    # "torch"; None off the CPU
    cpu_kernels: dict[str, str] | None = None


@dataclass
class EngineInfo:
    """Static facts about a loaded engine, for /v1/models and /v1/metadata."""

    model_name: str
    backend: str
    dtype: str
    kv_cache_dtype: str
    device: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    block_size: int
    num_kv_blocks: int
    details: EngineDetails = field(default_factory=EngineDetails)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.block_size * self.num_kv_blocks


class Engine(abc.ABC):
    """Contract of a kiln backend.

    - `start()` loads nothing new; it starts the step loop. `shutdown()` aborts what is left.
    - `generate()` accepts the request at once, or raises: `RequestError` (a ValueError) for an invalid request,
      `EngineOverloadedError` when the waiting queue is full, `EngineDeadError` once the loop died
      (so a server can answer with an HTTP status before it starts a stream). The iterator it returns
      yields `GenerationOutput` deltas until one has `finished=True`; it raises `RequestFailedError`
      when the engine failed on this request alone. Breaking out of the iteration (or cancelling the
      task) aborts the request and frees its KV blocks; so does `abort()`, also for an accepted request
      whose iterator was never started.
    - `abort()` of an unknown or finished request is a no-op.
    """

    @property
    @abc.abstractmethod
    def info(self) -> EngineInfo: ...

    @property
    @abc.abstractmethod
    def tokenizer(self): ...

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def shutdown(self) -> None: ...

    async def prepare(self, request: GenerationRequest) -> None:  # noqa: B027 (a no-op unless a backend needs it)
        """Slow work a request needs before `generate()` (compiling its structured-output grammar, cached by
        constraint), done off the event loop; raises ValueError (a RequestError where the backend names the
        field) for a constraint this backend cannot honour.
        `generate()` does it too when a caller skipped this."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Accept the request (or raise, see above) and return its stream of outputs."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...

    @property
    @abc.abstractmethod
    def is_alive(self) -> bool: ...
