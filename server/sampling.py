"""From an OpenAI request body to the engine's SamplingParams, with the context-length check."""

from __future__ import annotations

from typing import Protocol

from engines.base import EngineInfo, RequestError, SamplingParams, StructuredOutput
from server.errors import bad_request, from_request_error
from server.protocol import SamplingFields


def build_sampling_params(
    body: SamplingFields,
    requested_max_tokens: int | None,
    logprobs: int | None,
    num_prompt_tokens: int,
    info: EngineInfo,
    structured: StructuredOutput | None = None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """SamplingParams for one prompt; 400 for any invalid value or a request longer than the context.

    Without max_tokens (chat; a completion whose client sent null) the output may fill the rest of the context."""
    context = info.max_model_len
    max_tokens = requested_max_tokens if requested_max_tokens is not None else max(1, context - num_prompt_tokens)
    params = SamplingParams(
        n=body.n,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k is None else body.top_k,
        min_p=0.0 if body.min_p is None else body.min_p,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        logit_bias={int(token): bias for token, bias in (body.logit_bias or {}).items()},
        seed=body.seed,
        max_tokens=max_tokens,
        min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos,
        stop_token_ids=list(body.stop_token_ids or []),
        logprobs=logprobs,
        structured=structured,
        prompt_logprobs=prompt_logprobs,
    )
    try:
        params.validate(info.vocab_size)
    except RequestError as exc:
        raise from_request_error(exc, fields=type(body).model_fields) from None
    if num_prompt_tokens + max_tokens > context:
        raise bad_request(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the messages, {max_tokens} in the "
            "completion). Please reduce the length of the messages or completion.",
            param="messages",
            code="context_length_exceeded",
        )
    return params


class _NamesUnknownFields(Protocol):
    """A request body that keeps the fields it does not declare (SamplingFields, the tokenizer and Responses
    requests)."""

    @property
    def unknown_fields(self) -> list[str]: ...


def check_fields(body: _NamesUnknownFields) -> None:
    """400 naming the request fields kiln does not implement (metadata fields pass: protocol.METADATA_FIELDS)."""
    unknown = body.unknown_fields
    if unknown:
        names = ", ".join(repr(name) for name in unknown)
        raise bad_request(
            f"Unsupported request field{'s' if len(unknown) > 1 else ''} {names}: this server does "
            "not implement it, and ignoring it would change what you asked for.",
            param=unknown[0],
        )
