"""POST /v1/chat/completions against the live server, through the official openai SDK and raw HTTP."""

from __future__ import annotations

import pytest

from .conftest import sse_events

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
STORY = [{"role": "user", "content": "Tell me a short story about a robot who learns to paint."}]


def greedy(openai_client, model_name, **kwargs):
    params = dict(model=model_name, messages=STORY, max_tokens=16, temperature=0)
    params.update(kwargs)
    return openai_client.chat.completions.create(**params)


def test_non_streaming(openai_client, model_name):
    response = greedy(openai_client, model_name, messages=QUESTION, max_tokens=20)
    assert response.id.startswith("chatcmpl-")
    assert response.object == "chat.completion"
    assert response.model == model_name
    [choice] = response.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = response.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 20
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_text_equals_non_streamed(openai_client, model_name):
    expected = greedy(openai_client, model_name).choices[0].message.content
    chunks = list(greedy(openai_client, model_name, stream=True))
    assert len({chunk.id for chunk in chunks}) == 1
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(chunk.usage is None for chunk in chunks)


@pytest.mark.parametrize("n", [2, 3])
def test_n_choices(openai_client, model_name, n):
    single = greedy(openai_client, model_name, max_tokens=8).choices[0].message.content
    response = greedy(openai_client, model_name, max_tokens=8, n=n)
    assert [c.index for c in response.choices] == list(range(n))
    assert all(c.message.content == single for c in response.choices)  # greedy: every choice is the same
    assert response.usage.completion_tokens == sum(8 for _ in range(n))

    chunks = list(greedy(openai_client, model_name, max_tokens=8, n=n, stream=True))
    for index in range(n):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == single
        assert [c.finish_reason for c in mine if c.finish_reason] == ["length"]
        assert mine[-1].finish_reason == "length"


def test_sampled_choices_differ(openai_client, model_name):
    response = greedy(openai_client, model_name, max_tokens=12, n=3, temperature=1.0, seed=7)
    assert len({c.message.content for c in response.choices}) > 1


def test_stop_string_split_across_tokens_never_leaks(openai_client, model_name):
    reference = greedy(openai_client, model_name, max_tokens=24, logprobs=True)
    text = reference.choices[0].message.content
    tokens = [entry.token for entry in reference.choices[0].logprobs.content]
    # a stop string made of the end of one token and the start of the next, deep in the text
    k = next(i for i in range(4, len(tokens) - 1) if len(tokens[i]) >= 3 and len(tokens[i + 1]) >= 3)
    stop = tokens[k][-2:] + tokens[k + 1][:2]
    expected = text[: text.index(stop)]

    response = greedy(openai_client, model_name, max_tokens=24, stop=[stop, "never-generated-zzz"])
    assert response.choices[0].message.content == expected
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens <= k + 2

    chunks = list(greedy(openai_client, model_name, max_tokens=24, stop=stop, stream=True))
    pieces = [c.choices[0].delta.content or "" for c in chunks]
    assert "".join(pieces) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens_gives_length_and_exact_usage(openai_client, model_name):
    response = greedy(openai_client, model_name, max_tokens=5, extra_body={"ignore_eos": True})
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 5
    response = greedy(openai_client, model_name, max_tokens=None, max_completion_tokens=3)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 3


def test_usage_chunk_and_done(http, model_name):
    body = dict(
        model=model_name,
        messages=QUESTION,
        max_tokens=6,
        temperature=0,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 2 <= usage["completion_tokens"] <= 12
    assert all(e["usage"] is None for e in events[:-2])
    assert len({e["id"] for e in events[:-1]}) == 1
    finishes = [
        (e["choices"][0]["index"], e["choices"][0]["finish_reason"])
        for e in events[:-2]
        if e["choices"][0]["finish_reason"]
    ]
    assert sorted(index for index, _ in finishes) == [0, 1]


def test_logprobs_tokens_join_to_content(openai_client, model_name):
    response = greedy(openai_client, model_name, max_tokens=12, logprobs=True, top_logprobs=3)
    choice = response.choices[0]
    entries = choice.logprobs.content
    assert "".join(entry.token for entry in entries) == choice.message.content
    assert len(entries) == response.usage.completion_tokens
    for entry in entries:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        # greedy picks a most likely token (bf16 logits can tie, so compare values, not tokens)
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token

    chunks = list(greedy(openai_client, model_name, max_tokens=12, logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in entries]

    plain = greedy(openai_client, model_name, max_tokens=4, logprobs=True)
    assert all(entry.top_logprobs == [] for entry in plain.choices[0].logprobs.content)
    assert greedy(openai_client, model_name, max_tokens=4).choices[0].logprobs is None


def test_seed_makes_sampling_reproducible(openai_client, model_name):
    def sample(seed):
        return greedy(openai_client, model_name, max_tokens=12, temperature=1.0, seed=seed).choices[0].message.content

    assert sample(1234) == sample(1234)
    assert len({sample(1), sample(2), sample(3)}) > 1


def test_roles_and_content_parts(openai_client, model_name):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in English."}]},
        {"role": "user", "content": [{"type": "text", "text": "Name a colour."}, {"type": "text", "text": " One."}]},
        {"role": "assistant", "content": "Blue."},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
        {"role": "user", "content": "Another one?"},
    ]
    response = greedy(openai_client, model_name, messages=messages, max_tokens=4)
    assert response.choices[0].message.content


def test_sampling_extensions_accepted(openai_client, model_name):
    response = greedy(
        openai_client,
        model_name,
        max_tokens=6,
        temperature=0.7,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias={"198": -100},
        user="tester",
        seed=3,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 2},
    )
    assert response.usage.completion_tokens >= 2
