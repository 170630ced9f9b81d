"""Contract tests for what TensorRT-LLM 1.0's runtime does differently from what kiln first assumed (issue 22, items
2, 3 and 6), against the fake that now fails where the real API fails: logprobs need gather_generation_logits,
top_logprobs 0, iteration stats that latch and cannot be read from a thread, greedy n > 1, ignore_eos with the real
end_id, speculation on an engine not built for it, and --max-accuracy-loss with --backend trtllm."""

from __future__ import annotations

import asyncio

import pytest

from engines.base import GenerationRequest, SamplingParams
from engines.build.builder import BuildError, BuildOptions, build
from engines.trtllm.api import TrtllmUnsupported
from tests.trtllm.conftest import H100
from tests.trtllm.test_trtllm_engine import (  # noqa: F401
    EOS,
    calls,
    collect,
    engine_dir,
    make,
    run,
    with_generation_logits,
)

KV_RECORD = {
    "numActiveRequests": 7,  # TensorRT-LLM's own count, which kiln does not take (it lags and stops when idle)
    "numQueuedRequests": 5,
    "kvCacheStats": {
        "maxNumBlocks": 900,
        "usedNumBlocks": 30,
        "tokensPerBlock": 32,
        "reusedBlocks": 2,
        "missedBlocks": 3,
    },
}


# ---- item 2: logprobs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top", [0, 2])
def test_logprobs_on_an_engine_built_without_generation_logits_are_refused_in_one_sentence(
    engine_dir, fake_trtllm, top
):
    engine = make(engine_dir)

    async def go():
        await engine.start()
        return await collect(engine, GenerationRequest("r", [1, 5], SamplingParams(max_tokens=3, logprobs=top)))

    fix = "rebuild the engine with `kiln build --backend trtllm --gather-logits`"
    with pytest.raises(TrtllmUnsupported, match=fix):
        run(go())
    ((kwargs,),) = calls(fake_trtllm, "LLM")
    assert "gather_generation_logits" not in kwargs
    assert calls(fake_trtllm, "LLM.generate_async") == []


def test_an_engine_built_with_generation_logits_serves_top_logprobs_zero_and_k(engine_dir, fake_trtllm):
    """The LLM gets gather_generation_logits=True (BaseLLM._check_arguments needs it); OpenAI's top_logprobs 0 is
    the chosen token's logprob and no list, which TensorRT-LLM's falsy logprobs=0 would not return at all."""
    engine = make(with_generation_logits(engine_dir))
    ((kwargs,),) = calls(fake_trtllm, "LLM")
    assert kwargs["gather_generation_logits"] is True

    async def go(top):
        await engine.start()
        outs = await collect(engine, GenerationRequest(f"r{top}", [1, 5], SamplingParams(max_tokens=3, logprobs=top)))
        logprobs = [lp for o in outs for lp in o.outputs[0].new_logprobs]
        return logprobs, [t for o in outs for t in o.outputs[0].new_token_ids]

    chosen, tokens = run(go(0))
    assert [lp.token_id for lp in chosen] == tokens and len(tokens) == 3
    assert all(lp.logprob == -0.25 and lp.top == [] for lp in chosen)
    ranked, _ = run(go(2))
    assert all([lp for _, lp in t.top] == [-0.25, -0.5] and t.top[0][0] == t.token_id for t in ranked)
    sent = [params.logprobs for _, params, _ in calls(fake_trtllm, "LLM.generate_async")]
    assert sent == [1, 2]


# ---- item 3: running/waiting counted by kiln, KV figures from get_stats_async ---------------------------------------


def test_running_and_waiting_are_kiln_counts_and_kv_figures_come_from_get_stats_async(engine_dir, fake_trtllm):
    fake_trtllm.FAKE.step_seconds = 0.05
    fake_trtllm.FAKE.stats = [dict(KV_RECORD)]
    engine = make(engine_dir)
    seen = {}

    async def go():
        await engine.start()
        outs = []

        async def consume():
            async for out in engine.generate(GenerationRequest("r", [1, 5], SamplingParams(max_tokens=4))):
                outs.append(out)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.02)  # submitted, the first output (the first token) not there yet
        seen["before first token"] = (engine.stats().num_running, engine.stats().num_waiting)
        while not outs:
            await asyncio.sleep(0.005)
        seen["streaming"] = (engine.stats().num_running, engine.stats().num_waiting)
        await task
        seen["finished"] = (engine.stats().num_running, engine.stats().num_waiting)
        for _ in range(300):  # the poller reads the record the first step put
            if engine.stats().num_steps:
                break
            await asyncio.sleep(0.01)
        await engine.shutdown()

    run(go())
    assert seen == {"before first token": (0, 1), "streaming": (1, 0), "finished": (0, 0)}
    s = engine.stats()
    assert (s.num_steps, s.kv_blocks_total, s.kv_blocks_used) == (1, 900, 30)
    assert (s.prefix_cache_hits, s.prefix_cache_queries) == (2 * 32, 5 * 32)
    assert (engine.info.block_size, engine.info.num_kv_blocks) == (32, 900)
    assert calls(fake_trtllm, "LLM.get_stats_async") and not calls(fake_trtllm, "LLM.get_stats")


def test_the_fake_stats_behave_like_tensorrt_llm_1_0(engine_dir, fake_trtllm):
    """What the adapter must not rely on (executor/result.py IterationResult): get_stats from a thread loses its
    records to json.loads(None); get_stats_async ends on a timeout and stays ended until the next request."""
    llm = make(engine_dir).llm
    params = fake_trtllm.llmapi.SamplingParams(max_tokens=1, end_id=EOS)

    async def go():
        assert llm.get_stats(0.05) == []  # no request yet
        assert [r async for r in llm.get_stats_async(0.05)] == []
        fake_trtllm.FAKE.stats = [{"iter": 1}, {"iter": 2}]
        await collect_result(llm.generate_async([1, 2], sampling_params=params, streaming=True))
        assert [r["iter"] async for r in llm.get_stats_async(0.05)] == [1]
        llm._stats.put({"iter": 3})  # a record after the iterator ended waits for the next request
        assert [r async for r in llm.get_stats_async(0.05)] == []
        await collect_result(llm.generate_async([1, 2], sampling_params=params, streaming=True))
        assert [r["iter"] async for r in llm.get_stats_async(0.05)] == [3, 2]
        llm._stats.put({"iter": 4})
        llm.generate_async([1, 2], sampling_params=params, streaming=True)
        with pytest.raises(TypeError):  # the thread's get returns None on its timeout
            await asyncio.to_thread(llm.get_stats, 0.05)

    run(go())


async def collect_result(result):
    return [out async for out in result]


# ---- item 6: greedy n > 1, ignore_eos, speculation, --max-accuracy-loss ---------------------------------------------


def test_greedy_n_choices_run_one_sequence_copied_into_each_choice(engine_dir, fake_trtllm):
    """TensorRT-LLM's SamplingParams._validate refuses greedy with n > 1; kiln's torch backend answers n identical
    greedy choices, and so does the trtllm backend."""
    engine = make(engine_dir)

    async def go():
        await engine.start()
        request = GenerationRequest("r", [1, 5], SamplingParams(temperature=0.0, n=3, max_tokens=4))
        return await collect(engine, request)

    outs = run(go())
    ((_, params, _),) = calls(fake_trtllm, "LLM.generate_async")
    assert (params.n, params.top_k) == (1, 1)
    by_index: dict[int, list[int]] = {}
    for out in outs:
        for c in out.outputs:
            by_index.setdefault(c.index, []).extend(c.new_token_ids)
    assert sorted(by_index) == [0, 1, 2] and len(by_index[0]) == 4
    assert by_index[0] == by_index[1] == by_index[2]
    assert outs[-1].finished and {c.finish_reason for c in outs[-1].outputs} == {"length"}
    assert engine.stats().generation_tokens == 12


def test_ignore_eos_keeps_the_real_end_and_pad_ids(engine_dir, fake_trtllm):
    """SamplingParams(ignore_eos=True) with the real end_id: the executor request gets end_id -1 and the real pad_id
    (executor/worker.py _enqueue_request); end_id=-1 in SamplingParams would make pad_id -1 too."""
    fake_trtllm.FAKE.script = [11, EOS, 12, 13]
    engine = make(engine_dir)

    async def go():
        await engine.start()
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, stop_token_ids=[13])
        return await collect(engine, GenerationRequest("r", [1, 5], params))

    outs = run(go())
    ((_, params, _),) = calls(fake_trtllm, "LLM.generate_async")
    assert (params.kwargs["end_id"], params.kwargs["ignore_eos"]) == (EOS, True)
    assert calls(fake_trtllm, "executor request") == [[{"end_id": -1, "pad_id": EOS}]]
    assert [t for o in outs for t in o.outputs[0].new_token_ids] == [11, EOS, 12]  # stop_token_ids still stop
    assert outs[-1].outputs[0].stop_token_id == 13


@pytest.mark.parametrize("method", ["ngram", "draft", "eagle"])
def test_every_speculative_method_is_refused_before_the_engine_loads(engine_dir, fake_trtllm, tmp_path, method):
    """kiln's trtllm build compiles no engine for speculation, and an EagleDecodingConfig on such an engine fails
    when the LLM starts (the fake's LLM does too); eagle is no longer a speculative method at all."""
    with pytest.raises(TrtllmUnsupported, match="the trtllm backend does not run speculative decoding"):
        make(engine_dir, speculative_method=method, speculative_draft=str(tmp_path))
    assert calls(fake_trtllm, "LLM") == []


def test_max_accuracy_loss_is_refused_with_the_trtllm_backend(fake_trtllm, tiny_chat_folder, tmp_path):
    options = BuildOptions(
        model=str(tiny_chat_folder),
        output=str(tmp_path / "engine"),
        backend="trtllm",
        precision="fp8",
        max_accuracy_loss=0.05,
        progress=False,
    )
    with pytest.raises(BuildError, match="--max-accuracy-loss picks a precision by kiln's evaluation"):
        build(options, H100)
    assert calls(fake_trtllm, "LLM") == [] and not (tmp_path / "engine").exists()
