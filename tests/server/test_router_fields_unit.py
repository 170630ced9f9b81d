"""The fields vllm-router and sglang-router add to every body they forward (server/protocol.py ROUTER_DEFAULTS):
accepted at the values those routers send, which ask for what kiln does anyway, and refused at any other value,
as every unimplemented field is. The bodies below are what vllm-router 0.1.17 forwarded for a client's
{"model", "messages"/"prompt", "max_tokens"} (captured from the router; tests/scaleout drives the real one)."""

from __future__ import annotations

import pytest

from server.protocol import ChatCompletionRequest, CompletionRequest, TokenizeRequest

ROUTED_CHAT = {
    "model": "m",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": False,
    "max_tokens": 4,
    "logprobs": False,
    "no_stop_trim": False,
    "ignore_eos": False,
    "continue_final_message": False,
    "skip_special_tokens": True,
    "separate_reasoning": True,
    "stream_reasoning": True,
    "return_hidden_states": False,
    "include_reasoning": True,
}
ROUTED_COMPLETION = {
    "model": "m",
    "prompt": "hi",
    "max_tokens": 4,
    "stream": False,
    "echo": False,
    "no_stop_trim": False,
    "ignore_eos": False,
    "skip_special_tokens": True,
    "return_hidden_states": False,
}


def test_a_routed_body_has_no_unknown_fields():
    assert ChatCompletionRequest.model_validate(ROUTED_CHAT).unknown_fields == []
    assert CompletionRequest.model_validate(ROUTED_COMPLETION).unknown_fields == []


@pytest.mark.parametrize(
    "name, value",
    [
        ("skip_special_tokens", False),
        ("no_stop_trim", True),
        ("continue_final_message", True),
        ("return_hidden_states", True),
        ("include_reasoning", False),
        ("separate_reasoning", 1),  # not the boolean the router sends
    ],
)
def test_any_other_value_is_still_refused(name, value):
    assert ChatCompletionRequest.model_validate({**ROUTED_CHAT, name: value}).unknown_fields == [name]


def test_other_unknown_fields_are_still_named():
    body = {**ROUTED_CHAT, "chat_template_kwargs": {}}
    assert ChatCompletionRequest.model_validate(body).unknown_fields == ["chat_template_kwargs"]


def test_the_tokenize_call_of_cache_aware_routing_has_no_unknown_fields():
    # vllm-router's cache_aware policy tokenizes each chat on the workers (POST /tokenize) to match prefixes
    body = {"model": "m", "continue_final_message": False, "messages": [{"role": "user", "content": "hi"}]}
    assert TokenizeRequest.model_validate(body).unknown_fields == []
    assert TokenizeRequest.model_validate({**body, "continue_final_message": True}).unknown_fields == [
        "continue_final_message"
    ]
