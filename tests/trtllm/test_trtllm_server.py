"""kiln's HTTP server over TrtllmEngine (on the tensorrt_llm fake), driven by the official openai SDK:
the OpenAI shapes, streaming and metrics come out the same as with the torch backend."""

from __future__ import annotations

import asyncio

import httpx
import pytest

import engines.hardware
from engines.build.builder import BuildOptions, build
from engines.config import EngineConfig
from engines.trtllm.engine import TrtllmEngine
from server.app import create_app
from server.settings import ServerSettings
from tests.trtllm.conftest import H100, sdk_over_asgi
from tests.trtllm.test_trtllm_engine import with_generation_logits


@pytest.fixture
def trt_engine(fake_trtllm, tiny_chat_folder, tmp_path, monkeypatch):
    out = tmp_path / "engine"
    build(
        BuildOptions(
            model=str(tiny_chat_folder),
            output=str(out),
            backend="trtllm",
            precision="int8-sq",
            kv_cache_dtype="int8",
            calib_samples=16,
            progress=False,
        ),
        H100,
    )
    monkeypatch.setattr(engines.hardware, "detect", lambda device=None: H100)
    out = with_generation_logits(out)  # the completion below asks for logprobs
    return TrtllmEngine.from_config(EngineConfig(engine_dir=str(out), served_model_name="tiny-trt"))


def gauges(metrics: str) -> tuple[str, str]:
    """The running and waiting request gauges' values in /metrics text."""
    values = {
        line.split("{")[0]: line.rsplit(" ", 1)[1]
        for line in metrics.splitlines()
        if line.startswith(("kiln:num_requests_running{", "kiln:num_requests_waiting{"))
    }
    return values["kiln:num_requests_running"], values["kiln:num_requests_waiting"]


def test_openai_sdk_against_the_trtllm_backend(trt_engine, fake_trtllm):

    fake_trtllm.FAKE.tokens_per_step = 3
    app = create_app(ServerSettings(served_model_name="tiny-trt"), engine=trt_engine)

    async def go():
        await trt_engine.start()
        async with sdk_over_asgi(app) as (client, http):
            messages = [{"role": "user", "content": "Say something."}]
            whole = await client.chat.completions.create(
                model="tiny-trt", messages=messages, max_tokens=8, temperature=0
            )

            async def streamed():
                stream = await client.chat.completions.create(
                    model="tiny-trt",
                    messages=messages,
                    max_tokens=8,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                return [chunk async for chunk in stream]

            fake_trtllm.FAKE.step_seconds = 0.1  # each engine step takes a while: watch the gauges meanwhile
            task = asyncio.create_task(streamed())
            seen = set()
            while not task.done():
                seen.add(gauges((await http.get("/metrics")).text))
                await asyncio.sleep(0.005)
            chunks = await task
            fake_trtllm.FAKE.step_seconds = 0.0
            completion = await client.completions.create(model="tiny-trt", prompt=[1, 2, 3], max_tokens=4, logprobs=2)
            metrics = (await http.get("/metrics")).text
            metadata = (await http.get("/v1/metadata")).json()
        await trt_engine.shutdown()
        return whole, chunks, completion, metrics, metadata, seen

    whole, chunks, completion, metrics, metadata, seen = asyncio.run(go())
    # (running, waiting): waiting until the first token, running while it streams, nothing once done
    assert {("0.0", "1.0"), ("1.0", "0.0")} <= seen <= {("0.0", "0.0"), ("0.0", "1.0"), ("1.0", "0.0")}
    assert gauges(metrics) == ("0.0", "0.0")
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 8
    assert whole.choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 8
    assert len(completion.choices[0].logprobs.tokens) == 4
    assert all(len(top) == 2 for top in completion.choices[0].logprobs.top_logprobs)
    assert 'kiln:generation_tokens_total{model_name="tiny-trt"} 20.0' in metrics
    assert (metadata["backend"], metadata["precision"], metadata["kv_cache_dtype"]) == ("trtllm", "int8-sq", "int8")
    generate_calls = [c for c in fake_trtllm.CALLS if c[0] == "LLM.generate_async"]
    assert len(generate_calls) == 3 and all(streaming for *_, streaming in generate_calls)


def test_a_failed_request_is_a_500_for_that_request_and_a_stopped_executor_a_503(trt_engine, fake_trtllm):
    app = create_app(ServerSettings(served_model_name="tiny-trt"), engine=trt_engine)
    body = {"model": "tiny-trt", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}

    async def go():
        await trt_engine.start()
        # Starlette answers an exception handled as a 500 and then re-raises it to the server; don't let httpx raise it
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://kiln") as http:
            fake_trtllm.FAKE.fail_request = "[TensorRT-LLM][ERROR] this request failed"
            failed = await http.post("/v1/chat/completions", json=body)
            served = await http.post("/v1/chat/completions", json=body)
            fake_trtllm.FAKE.fail_generation = "executor worker died"
            dead = await http.post("/v1/chat/completions", json=body)
        await trt_engine.shutdown()
        return failed, served, dead

    failed, served, dead = asyncio.run(go())
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "request_failed"
    assert "this request failed" in failed.json()["error"]["message"]
    assert served.status_code == 200 and served.json()["choices"][0]["finish_reason"] == "length"
    assert dead.status_code == 503 and dead.json()["error"]["code"] == "engine_dead"
