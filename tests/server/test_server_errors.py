"""Every error case against the live server: status, OpenAI envelope, and the SDK's exception type."""

from __future__ import annotations

import openai
import pytest

from .conftest import assert_error

pytestmark = pytest.mark.slow

HI = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    "override, param",
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"logprobs": True, "top_logprobs": 21}, None),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"99999999": 1}}, None),
        ({"logit_bias": {"5": 150}}, None),
        ({"stop_token_ids": [-1]}, None),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
        ),
        ({"tools": [{"type": "function", "function": {"name": "f"}}] * 2}, "tools"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
        ({"structured_outputs": {"regex": "a+", "choice": ["a"]}}, "structured_outputs"),
        ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
        ({"response_format": {"type": "json_object"}, "min_tokens": 2}, "min_tokens"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None),
    ],
)
def test_invalid_chat_values_are_400(http, model_name, override, param):
    body = {"model": model_name, "messages": HI, "max_tokens": 4, **override}
    error = assert_error(http.post("/v1/chat/completions", json=body), 400)
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error


@pytest.mark.parametrize(
    "override, contains",
    [
        ({"suffix": "and then"}, "suffix"),
        ({"logprobs": 21}, "logprobs"),
        ({"max_tokens": 0}, "echo"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"best_of": 3}, "best_of"),
        ({"prompt": [1, 2, 10**9]}, "outside the vocabulary"),
        ({"prompt": [[1, 2], [-5]]}, "outside the vocabulary"),
        ({"prompt": ""}, "empty"),
        ({"temperature": 9}, "temperature"),
    ],
)
def test_invalid_completion_values_are_400(http, model_name, override, contains):
    body = {"model": model_name, "prompt": "Hello", "max_tokens": 4, **override}
    assert_error(http.post("/v1/completions", json=body), 400, contains=contains)


def test_context_length_exceeded(http, model_name):
    max_model_len = http.get("/v1/models").json()["data"][0]["max_model_len"]
    response = http.post(
        "/v1/chat/completions", json={"model": model_name, "messages": HI, "max_tokens": max_model_len}
    )
    error = assert_error(response, 400, contains=f"This model's maximum context length is {max_model_len} tokens.")
    prompt_tokens = int(error["message"].split("(")[1].split(" in the messages")[0])
    assert error["message"] == (
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{prompt_tokens + max_model_len} tokens ({prompt_tokens} in the messages, {max_model_len} in the "
        "completion). Please reduce the length of the messages or completion."
    )
    long_prompt = "word " * (max_model_len + 10)
    response = http.post("/v1/completions", json={"model": model_name, "prompt": long_prompt})
    assert_error(response, 400, contains="maximum context length")


def test_malformed_and_wrong_bodies_are_400_not_422(http):
    for content in (b"{not json", b"[]", b'"text"', b"", b'{"messages": [{"role": "user"}], "n": "x"}'):
        response = http.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
        assert_error(response, 400)
    assert_error(
        http.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}), 400, contains="role"
    )


def test_unknown_model_is_404(http, openai_client):
    for path, body in (("/v1/chat/completions", {"messages": HI}), ("/v1/completions", {"prompt": "Hi"})):
        error = assert_error(http.post(path, json={"model": "no-such-model", **body}), 404)
        assert error["code"] == "model_not_found" and error["param"] == "model"
    assert_error(http.get("/v1/models/no-such-model"), 404)
    with pytest.raises(openai.NotFoundError):
        openai_client.chat.completions.create(model="no-such-model", messages=HI)


def test_sdk_raises_bad_request(openai_client, model_name):
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client.chat.completions.create(model=model_name, messages=HI, temperature=5)
    assert raised.value.status_code == 400
    assert "temperature" in raised.value.message


def test_api_key_on_the_live_server(live_server, model_name):
    import httpx

    with httpx.Client(base_url=live_server.base_url, timeout=30) as anonymous:
        error = assert_error(anonymous.get("/v1/models"), 401)
        assert error["code"] == "invalid_api_key"
        wrong = {"Authorization": "Bearer not-the-key"}
        assert_error(anonymous.post("/v1/chat/completions", json={"messages": HI}, headers=wrong), 401)
        for open_path in ("/v1/health/live", "/v1/health/ready", "/health", "/metrics"):
            assert anonymous.get(open_path).status_code == 200
    bad = openai.OpenAI(base_url=f"{live_server.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
