"""Errors map to OpenAI's envelope by type: the engine's RequestErrors carry their `param` and `code`, the
server reads them instead of parsing the message, and keeps a param only where the request body has that field."""

from __future__ import annotations

import pytest

from engines.base import (
    ContextLengthExceededError,
    EngineDeadError,
    EngineInfo,
    InvalidValueError,
    RequestError,
    RequestFailedError,
    UnsupportedRequestError,
)
from server.errors import APIError, from_exception
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.sampling import build_sampling_params

INFO = EngineInfo(
    model_name="m",
    backend="torch",
    dtype="float32",
    kv_cache_dtype="float32",
    device="cpu",
    max_model_len=64,
    vocab_size=100,
    eos_token_ids=[2],
    block_size=16,
    num_kv_blocks=8,
)


def test_request_errors_stay_value_errors_for_callers_written_before_them():
    for kind in (RequestError, InvalidValueError, UnsupportedRequestError, ContextLengthExceededError):
        assert issubclass(kind, ValueError)


def test_a_request_error_is_a_400_with_its_param_and_code():
    error = from_exception(InvalidValueError("Whatever the sentence says first.", "temperature"))
    assert error.body() == {
        "error": {
            "message": "Whatever the sentence says first.",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": None,
        }
    }
    error = from_exception(ContextLengthExceededError("Too long."))
    assert (error.status_code, error.param, error.code) == (400, None, "context_length_exceeded")


def test_a_plain_value_error_is_still_a_400_without_param():
    error = from_exception(ValueError("temperature is wrong"))
    assert (error.status_code, error.param, error.code) == (400, None, None)


@pytest.mark.parametrize(
    "exc, status, code",
    [
        (RequestFailedError("boom"), 500, "request_failed"),
        (EngineDeadError("gone"), 503, "engine_dead"),
    ],
)
def test_a_failed_request_and_a_dead_engine_are_told_apart(exc, status, code):
    error = from_exception(exc)
    assert (error.status_code, error.code) == (status, code)


def sampling_error(body) -> APIError:
    with pytest.raises(APIError) as info:
        build_sampling_params(body, body.max_tokens, getattr(body, "top_logprobs", None), 4, INFO)
    return info.value


def test_sampling_errors_name_the_field_of_the_body():
    chat = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stop_token_ids=[500]
    )
    error = sampling_error(chat)
    assert error.message.startswith("stop token id 500 is outside the vocabulary")
    assert error.param == "stop_token_ids"  # the field, not the sentence's first word ("stop")
    ignore = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, presence_penalty=3
    )
    assert sampling_error(ignore).param == "presence_penalty"


def test_a_param_the_body_does_not_have_is_left_out():
    """SamplingParams calls its logprobs top_logprobs (chat's name); a completions body has no such field."""
    body = CompletionRequest(model="m", prompt="Hi", max_tokens=4)
    with pytest.raises(APIError) as info:
        build_sampling_params(body, 4, 21, 4, INFO)
    assert info.value.message.startswith("top_logprobs must be between") and info.value.param is None
