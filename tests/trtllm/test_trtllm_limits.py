"""The sequence limits of a TensorRT engine (issue 22, item 5): kiln compiles the model's whole context, turns chunked
prefill on where the build keeps paged context FMHA, records the limits the executor applies in engine.json, and
answers a prompt the executor would fail with its usual 400 before the engine sees it. The fake's executor fails
where TensorRT-LLM 1.0's does (tests/fake_trtllm/tensorrt_llm/_build.py)."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

import engines.hardware
from engines.base import ContextLengthExceededError, GenerationRequest, SamplingParams
from engines.build import manifest as mf
from engines.build.builder import BuildOptions, build
from engines.config import EngineConfig
from engines.trtllm.engine import TrtllmEngine
from engines.trtllm.limits import input_limit
from tests.trtllm.conftest import A100, H100, sdk_over_asgi

CONTEXT = 16384  # longer than one engine step (max_num_tokens 8192), so chunking decides what a prompt may be
LONG = 9000


@pytest.fixture(scope="module")
def long_context_folder(tiny_chat_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("trt-long") / "model"
    shutil.copytree(tiny_chat_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"max_position_embeddings": CONTEXT}))
    return folder


def serve(fake_trtllm, folder, tmp_path, monkeypatch, gpu, **kw) -> TrtllmEngine:
    out = tmp_path / "engine"
    options = BuildOptions(model=str(folder), output=str(out), backend="trtllm", calib_samples=16, progress=False, **kw)
    build(options, gpu)
    monkeypatch.setattr(engines.hardware, "detect", lambda device=None: gpu)
    fake_trtllm.reset()
    return TrtllmEngine.from_config(EngineConfig(engine_dir=str(out)))


def generate(engine, prompt_len: int, max_tokens: int = 4):
    async def go():
        await engine.start()
        request = GenerationRequest("r", [7] * prompt_len, SamplingParams(temperature=0.0, max_tokens=max_tokens))
        return [out async for out in engine.generate(request)]

    return asyncio.run(go())


def calls(fake, name):
    return [args for (kind, *args) in fake.CALLS if kind == name]


def test_a_chunked_prefill_engine_takes_a_prompt_as_long_as_its_context(
    fake_trtllm, long_context_folder, tmp_path, monkeypatch
):
    engine = serve(
        fake_trtllm, long_context_folder, tmp_path, monkeypatch, H100, precision="bf16", kv_cache_dtype="model"
    )
    m = engine.manifest
    assert (m.max_model_len, m.trtllm.max_seq_len, m.trtllm.max_num_tokens) == (CONTEXT, CONTEXT, 8192)
    assert (m.trtllm.max_input_len, m.trtllm.chunked_prefill) == (CONTEXT - 1, True)
    assert engine.info.max_model_len == CONTEXT
    ((kwargs,),) = calls(fake_trtllm, "LLM")
    assert kwargs["enable_chunked_prefill"] is True
    outs = generate(engine, LONG)  # one prompt longer than an engine step, prefilled in chunks
    assert sum(len(o.outputs[0].new_token_ids) for o in outs) == 4


def test_an_int8_kv_engine_refuses_a_prompt_longer_than_one_step_before_the_engine(
    fake_trtllm, long_context_folder, tmp_path, monkeypatch
):
    """builder.build drops paged context FMHA for an INT8 KV cache (the Ampere default), so no chunked prefill and the
    executor takes min(max_seq_len - 1, max_num_tokens) prompt tokens."""
    engine = serve(
        fake_trtllm, long_context_folder, tmp_path, monkeypatch, A100, precision="int8-sq", kv_cache_dtype="int8"
    )
    assert (engine.manifest.trtllm.max_input_len, engine.manifest.trtllm.chunked_prefill) == (8192, False)
    ((kwargs,),) = calls(fake_trtllm, "LLM")
    assert "enable_chunked_prefill" not in kwargs  # the executor would refuse chunked context on this engine
    with pytest.raises(ContextLengthExceededError, match="at most 8192 tokens") as info:
        generate(engine, LONG)
    assert info.value.code == "context_length_exceeded"
    assert calls(fake_trtllm, "LLM.generate_async") == []  # refused before the engine
    assert sum(len(o.outputs[0].new_token_ids) for o in generate(engine, 8192)) == 4  # the longest prompt it takes


def test_the_openai_sdk_gets_a_400_for_a_prompt_the_engine_cannot_take(
    fake_trtllm, long_context_folder, tmp_path, monkeypatch
):
    from openai import BadRequestError

    from server.app import create_app
    from server.settings import ServerSettings

    engine = serve(
        fake_trtllm, long_context_folder, tmp_path, monkeypatch, A100, precision="int8-sq", kv_cache_dtype="int8"
    )
    app = create_app(ServerSettings(served_model_name="tiny-trt"), engine=engine)

    async def go():
        await engine.start()
        async with sdk_over_asgi(app) as (client, http):
            with pytest.raises(BadRequestError) as info:
                await client.completions.create(model="tiny-trt", prompt=[7] * LONG, max_tokens=4)
            ok = await client.completions.create(model="tiny-trt", prompt=[7] * 100, max_tokens=4)
        await engine.shutdown()
        return info.value, ok

    error, ok = asyncio.run(go())
    assert error.status_code == 400 and error.code == "context_length_exceeded" and "8192" in error.message
    assert ok.usage.completion_tokens == 4


def test_the_fake_executor_fails_like_tensorrt_llm_without_kilns_check(
    fake_trtllm, long_context_folder, tmp_path, monkeypatch
):
    """What kiln's check stands in for: LlmRequest::validate fails the request, and chunked context on an engine without
    paged context FMHA fails the executor's start."""
    from tensorrt_llm.executor import RequestError
    from tensorrt_llm.llmapi import LLM, SamplingParams

    serve(fake_trtllm, long_context_folder, tmp_path, monkeypatch, A100, precision="int8-sq", kv_cache_dtype="int8")
    engine_dir = str(tmp_path / "engine" / "trtllm")
    with pytest.raises(RuntimeError, match="Chunked context requires context FMHA"):
        LLM(model=engine_dir, enable_chunked_prefill=True)
    llm = LLM(model=engine_dir)

    async def go():
        result = llm.generate_async([7] * LONG, sampling_params=SamplingParams(max_tokens=4), streaming=True)
        return [r async for r in result]

    with pytest.raises(RequestError, match=f"Prompt length \\({LONG}\\) exceeds maximum input length \\(8192\\)"):
        asyncio.run(go())


def test_engines_built_before_the_limits_were_recorded_use_the_executors_rule():
    old = mf.TrtllmBuild(version="1.0.0", build_config={"max_batch_size": 64, "max_num_tokens": 8192})
    assert input_limit(old, 2048) == 2047 and input_limit(old, 32768) == 8192
    assert input_limit(mf.TrtllmBuild(version="1.0.0", max_input_len=4095), 4096) == 4095
