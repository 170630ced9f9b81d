"""TrtllmEngine against the recording fake of tensorrt_llm: how kiln starts the LLM (KV cache, scheduler), maps
every sampling field, turns streamed RequestOutputs into kiln outputs, aborts, fails requests, and picks the
backend (logprobs, stats, greedy n, ignore_eos and speculation as TensorRT-LLM 1.0 does them:
test_trtllm_runtime_contract.py)."""

from __future__ import annotations

import asyncio

import pytest

import engines.hardware
from engines import create_engine, select_backend
from engines.base import EngineDeadError, GenerationRequest, RequestFailedError, SamplingParams
from engines.build import manifest as mf
from engines.build.builder import BuildOptions, build
from engines.config import EngineConfig
from engines.trtllm import configs
from engines.trtllm.api import TrtllmUnavailable, TrtllmUnsupported
from engines.trtllm.engine import TrtllmEngine
from tests.trtllm.conftest import A100, CPU, H100

EOS = 2  # SmolLM2's <|im_end|>


@pytest.fixture
def engine_dir(fake_trtllm, tiny_chat_folder, tmp_path, monkeypatch):
    out = tmp_path / "engine"
    build(
        BuildOptions(
            model=str(tiny_chat_folder),
            output=str(out),
            backend="trtllm",
            precision="fp8",
            calib_samples=16,
            progress=False,
        ),
        H100,
    )
    monkeypatch.setattr(engines.hardware, "detect", lambda device=None: H100)
    fake_trtllm.reset()
    return out


def make(engine_dir, **kw) -> TrtllmEngine:
    return TrtllmEngine.from_config(EngineConfig(engine_dir=str(engine_dir), **kw))


def with_generation_logits(engine_dir):
    """The engine directory as `kiln build --backend trtllm --gather-logits` records it."""
    manifest = mf.load_manifest(engine_dir, verify=False)
    trtllm = manifest.trtllm.model_copy(update={"gather_generation_logits": True})
    mf.write_manifest(engine_dir, manifest.model_copy(update={"trtllm": trtllm}))
    return engine_dir


def calls(fake, name):
    return [args for (kind, *args) in fake.CALLS if kind == name]


async def collect(engine, request):
    return [out async for out in engine.generate(request)]


def run(coro):
    return asyncio.run(coro)


def test_the_llm_is_started_on_the_engine_with_kv_cache_and_scheduler_configs(engine_dir, fake_trtllm):
    engine = make(engine_dir)
    ((kwargs,),) = calls(fake_trtllm, "LLM")
    assert kwargs["model"] == str(engine_dir / "trtllm") and kwargs["tokenizer"] == str(engine_dir)
    assert kwargs["kv_cache_config"].kwargs == {"free_gpu_memory_fraction": 0.9, "enable_block_reuse": True}
    assert kwargs["scheduler_config"].kwargs["capacity_scheduler_policy"].name == "GUARANTEED_NO_EVICT"
    assert "speculative_config" not in kwargs
    assert (engine.info.backend, engine.info.dtype, engine.info.kv_cache_dtype, engine.info.max_model_len) == (
        "trtllm",
        "fp8",
        "fp8",
        2048,
    )

    fake_trtllm.reset()
    make(engine_dir, gpu_memory_fraction=0.5, enable_prefix_caching=False, scheduler_policy="max_utilization")
    ((kwargs,),) = calls(fake_trtllm, "LLM")
    assert kwargs["kv_cache_config"].kwargs == {"free_gpu_memory_fraction": 0.5, "enable_block_reuse": False}
    assert kwargs["scheduler_config"].kwargs["capacity_scheduler_policy"].name == "MAX_UTILIZATION"


SAMPLING_CASES = [
    (
        SamplingParams(temperature=0.0, max_tokens=7),
        dict(max_tokens=7, n=1, temperature=0.0, top_k=1, detokenize=False, end_id=EOS),
    ),
    (
        SamplingParams(
            temperature=0.8,
            top_p=0.9,
            top_k=40,
            min_p=0.05,
            presence_penalty=0.5,
            frequency_penalty=0.25,
            repetition_penalty=1.1,
            seed=7,
            max_tokens=20,
            min_tokens=3,
            stop_token_ids=[5, 6],
            logprobs=2,
            n=3,
        ),
        dict(
            max_tokens=20,
            n=3,
            temperature=0.8,
            top_p=0.9,
            top_k=40,
            min_p=0.05,
            presence_penalty=0.5,
            frequency_penalty=0.25,
            repetition_penalty=1.1,
            seed=7,
            min_tokens=3,
            stop_token_ids=[5, 6],
            logprobs=2,
            detokenize=False,
            end_id=EOS,
        ),
    ),
    (
        SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=4),
        dict(max_tokens=4, n=1, temperature=1.0, top_p=1.0, detokenize=False, end_id=EOS, ignore_eos=True),
    ),
]


@pytest.mark.parametrize("params, expected", SAMPLING_CASES)
def test_every_sampling_field_maps_to_sampling_params(fake_trtllm, params, expected):
    from engines.trtllm.api import load

    mapped = configs.sampling_params(load(), params, [EOS], 49152, gather_logits=True)
    assert mapped.kwargs == expected


def test_extra_eos_ids_stop_too_and_logit_bias_is_refused(fake_trtllm):
    from engines.trtllm.api import load

    mapped = configs.sampling_params(load(), SamplingParams(max_tokens=4, stop_token_ids=[9]), [EOS, 0], 49152)
    assert (mapped.end_id, mapped.stop_token_ids) == (EOS, [9, 0])
    with pytest.raises(TrtllmUnsupported, match="logit_bias is not supported"):
        configs.sampling_params(load(), SamplingParams(logit_bias={5: 1.0}), [EOS], 49152)
    with pytest.raises(TrtllmUnsupported, match="prompt logprobs"):
        configs.sampling_params(load(), SamplingParams(prompt_logprobs=1), [EOS], 49152)


def test_streaming_maps_token_diffs_and_finish_reasons(engine_dir, fake_trtllm):
    fake_trtllm.FAKE.tokens_per_step = 2
    engine = make(engine_dir)

    async def go():
        await engine.start()
        request = GenerationRequest("r1", [1, 100, 200], SamplingParams(temperature=0.0, max_tokens=5))
        return await collect(engine, request)

    outs = run(go())
    ((prompt, params, streaming),) = calls(fake_trtllm, "LLM.generate_async")
    assert (prompt, streaming, params.max_tokens) == ([1, 100, 200], True, 5)
    assert [len(o.outputs[0].new_token_ids) for o in outs] == [2, 2, 1]  # diffs, not cumulative ids
    tokens = [t for o in outs for t in o.outputs[0].new_token_ids]
    assert [o.outputs[0].num_generated for o in outs] == [2, 4, 5]
    assert [o.finished for o in outs] == [False, False, True]
    assert outs[-1].outputs[0].finish_reason == "length" and outs[0].outputs[0].finish_reason is None
    assert len(tokens) == 5 and outs[-1].num_prompt_tokens == 3
    assert outs[-1].timings.first_token is not None and outs[-1].timings.finished is not None
    assert engine.stats().generation_tokens == 5 and engine.stats().prompt_tokens == 3


@pytest.mark.parametrize(
    "script, params, reason, stop_token",
    [
        ([11, 12, EOS, 13], SamplingParams(temperature=0.0, max_tokens=9), "stop", None),
        ([11, 12, 99, 13], SamplingParams(temperature=0.0, max_tokens=9, stop_token_ids=[99]), "stop", 99),
        ([11, 12, EOS, 13], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), "length", None),
    ],
)
def test_eos_stop_ids_and_ignore_eos(engine_dir, fake_trtllm, script, params, reason, stop_token):
    fake_trtllm.FAKE.script = script
    engine = make(engine_dir)

    async def go():
        await engine.start()
        return await collect(engine, GenerationRequest("r", [1, 5], params))

    outs = run(go())
    tokens = [t for o in outs for t in o.outputs[0].new_token_ids]
    last = outs[-1].outputs[0]
    assert (last.finish_reason, last.stop_token_id) == (reason, stop_token)
    assert tokens == ([11, 12] if reason == "stop" else [11, 12, EOS, 13])


def test_n_choices_and_logprobs(engine_dir, fake_trtllm):
    engine = make(with_generation_logits(engine_dir))

    async def go():
        await engine.start()
        return await collect(engine, GenerationRequest("r", [1, 5], SamplingParams(n=2, max_tokens=3, logprobs=2)))

    outs = run(go())
    by_index = {}
    for out in outs:
        for c in out.outputs:
            by_index.setdefault(c.index, []).extend(c.new_logprobs)
    assert set(by_index) == {0, 1} and all(len(v) == 3 for v in by_index.values())
    first = by_index[0][0]
    assert first.logprob == -0.25 and [lp for _, lp in first.top] == [-0.25, -0.5]
    assert first.top[0][0] == first.token_id


def test_closing_the_stream_aborts_the_request(engine_dir, fake_trtllm):
    engine = make(engine_dir)

    async def go():
        await engine.start()
        stream = engine.generate(GenerationRequest("r", [1, 5], SamplingParams(max_tokens=50)))
        await stream.__anext__()
        await stream.aclose()

    run(go())
    assert len(calls(fake_trtllm, "RequestOutput.abort")) == 1


def test_abort_by_id_reaches_the_request_and_finishes_it(engine_dir, fake_trtllm):
    engine = make(engine_dir)

    async def go():
        await engine.start()
        outs = []
        async for out in engine.generate(GenerationRequest("r", [1, 5], SamplingParams(max_tokens=50))):
            outs.append(out)
            if len(outs) == 2:
                await engine.abort("r")
        await engine.abort("unknown")  # a no-op
        return outs

    outs = run(go())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert len(calls(fake_trtllm, "RequestOutput.abort")) == 1


def test_bad_requests_are_value_errors(engine_dir, fake_trtllm):
    engine = make(engine_dir)

    async def go(request):
        await engine.start()
        return await collect(engine, request)

    with pytest.raises(ValueError, match="maximum context length is 2048 tokens"):
        run(go(GenerationRequest("r", [1] * 2000, SamplingParams(max_tokens=100))))
    with pytest.raises(ValueError, match="logit_bias"):
        run(go(GenerationRequest("r2", [1], SamplingParams(logit_bias={3: 1.0}))))
    assert calls(fake_trtllm, "LLM.generate_async") == []


def test_backend_selection(engine_dir, fake_trtllm, tmp_path):
    assert select_backend(EngineConfig(engine_dir=str(engine_dir))) == "trtllm"
    assert select_backend(EngineConfig(engine_dir=str(engine_dir), backend="trtllm")) == "trtllm"
    assert select_backend(EngineConfig()) == "torch"
    with pytest.raises(ValueError, match="holds a TensorRT-LLM engine; serve it with --backend trtllm"):
        select_backend(EngineConfig(engine_dir=str(engine_dir), backend="torch"))
    with pytest.raises(ValueError, match="serves engine directories built with `kiln build --backend trtllm`"):
        select_backend(EngineConfig(backend="trtllm"))
    assert isinstance(create_engine(EngineConfig(engine_dir=str(engine_dir))), TrtllmEngine)


def test_serving_without_tensorrt_llm_or_without_a_suitable_gpu_says_why(engine_dir, fake_trtllm, monkeypatch):
    from engines.build.manifest import EngineDirError

    monkeypatch.setattr(engines.hardware, "detect", lambda device=None: A100)
    with pytest.raises(EngineDirError, match="needs a GPU with SM >= 89"):
        create_engine(EngineConfig(engine_dir=str(engine_dir)))
    monkeypatch.setattr(engines.hardware, "detect", lambda device=None: CPU)
    with pytest.raises(TrtllmUnavailable, match="needs an NVIDIA GPU"):
        create_engine(EngineConfig(engine_dir=str(engine_dir)))
    import sys

    monkeypatch.setattr(sys, "path", [p for p in sys.path if "fake_trtllm" not in p])
    for name in [m for m in sys.modules if m.startswith("tensorrt_llm")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(TrtllmUnavailable, match="needs the tensorrt_llm package"):
        create_engine(EngineConfig(engine_dir=str(engine_dir)))


def test_a_request_the_executor_fails_fails_alone_and_the_engine_serves_on(engine_dir, fake_trtllm):
    """TensorRT-LLM raises an error response for one request as RequestError from that result (see
    TrtllmEngine._results_of): that request fails (RequestFailedError, HTTP 500), the engine stays alive."""
    engine = make(engine_dir)

    async def go():
        await engine.start()
        fake_trtllm.FAKE.fail_request = "[TensorRT-LLM][ERROR] this request failed"
        with pytest.raises(RequestFailedError, match="this request failed"):
            await collect(engine, GenerationRequest("a", [1, 2], SamplingParams(max_tokens=3)))
        assert engine.is_alive
        return await collect(engine, GenerationRequest("b", [1, 2], SamplingParams(max_tokens=3)))

    assert run(go())[-1].finished


def test_an_executor_that_stops_makes_the_engine_dead(engine_dir, fake_trtllm):
    """Any other error from a result is the executor's own (TensorRT-LLM shuts it down before raising it):
    EngineDeadError (HTTP 503), the engine is no longer alive and refuses what comes next."""
    engine = make(engine_dir)

    async def go():
        await engine.start()
        fake_trtllm.FAKE.fail_generation = "executor worker died"
        with pytest.raises(EngineDeadError, match="executor stopped: executor worker died"):
            await collect(engine, GenerationRequest("a", [1, 2], SamplingParams(max_tokens=3)))
        assert not engine.is_alive and engine.llm.shut_down
        with pytest.raises(EngineDeadError):
            engine.generate(GenerationRequest("b", [1, 2], SamplingParams(max_tokens=3)))

    run(go())
