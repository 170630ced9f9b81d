"""Many streams at once, and client disconnects that must free the engine's slots and KV blocks."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from .conftest import scrape, wait_until

pytestmark = pytest.mark.slow

STORY = [{"role": "user", "content": "Write a long story about the sea."}]


def idle(http) -> dict[str, float]:
    """Metrics once nothing runs or waits (earlier tests' aborts may still be landing)."""

    def quiet():
        m = scrape(http)
        return m if m["kiln:num_requests_running"] == 0 and m["kiln:num_requests_waiting"] == 0 else None

    metrics = wait_until(quiet, timeout=30)
    assert metrics, scrape(http)
    return metrics


def test_sixteen_concurrent_streams(async_openai_factory, model_name, http):
    before = idle(http)

    async def one(client, i):
        stream = await client.chat.completions.create(
            model=model_name,
            messages=[{"role": "user", "content": f"Count to ten, attempt {i}."}],
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        text, finishes, usage, ids = [], [], None, set()
        async for chunk in stream:
            ids.add(chunk.id)
            if chunk.usage:
                usage = chunk.usage
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                if choice.finish_reason:
                    finishes.append(choice.finish_reason)
        return "".join(text), finishes, usage, ids

    async def all_of_them():
        client = async_openai_factory()
        async with client:
            return await asyncio.gather(*(one(client, i) for i in range(16)))

    results = asyncio.run(all_of_them())
    assert len({next(iter(ids)) for *_, ids in results}) == 16  # one id per response, all distinct
    for text, finishes, usage, ids in results:
        assert len(ids) == 1
        assert text
        assert finishes == ["length"]
        assert usage.completion_tokens == 8
    after = idle(http)
    assert after["kiln:generation_tokens_total"] - before["kiln:generation_tokens_total"] >= 16 * 8
    assert after['kiln:request_success_total{finished_reason="length"}'] >= 16


def test_stream_disconnect_frees_the_request(live_server, http, model_name):
    baseline = idle(http)["kiln:kv_cache_usage_perc"]
    body = dict(model=model_name, messages=STORY, max_tokens=1000, stream=True, ignore_eos=True)
    with httpx.Client(base_url=live_server.base_url, headers=live_server.headers, timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            for _ in range(5):
                next(lines)
            running = scrape(http)
            assert running["kiln:num_requests_running"] == 1
            assert running["kiln:kv_cache_usage_perc"] > baseline
        closed_at = time.monotonic()
    freed = wait_until(lambda: scrape(http)["kiln:num_requests_running"] == 0, timeout=10)
    elapsed = time.monotonic() - closed_at
    assert freed, scrape(http)
    assert elapsed < 5.0  # one engine step, with room for a busy 2-core machine
    assert wait_until(lambda: scrape(http)["kiln:kv_cache_usage_perc"] == baseline, timeout=5), scrape(http)


def test_non_streaming_disconnect_frees_the_request(live_server, http, model_name):
    baseline = idle(http)["kiln:kv_cache_usage_perc"]
    body = dict(model=model_name, messages=STORY, max_tokens=1000, ignore_eos=True)
    with httpx.Client(base_url=live_server.base_url, headers=live_server.headers, timeout=1.5) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/chat/completions", json=body)
    assert wait_until(lambda: scrape(http)["kiln:num_requests_running"] == 0, timeout=10), scrape(http)
    assert wait_until(lambda: scrape(http)["kiln:kv_cache_usage_perc"] == baseline, timeout=5), scrape(http)
