"""AsyncTorchEngine: streaming from the step-loop thread, concurrent requests, aborts free blocks."""

import asyncio

import pytest

from engines.base import EngineDeadError, GenerationRequest
from engines.config import EngineConfig
from engines.torch.engine import AsyncTorchEngine
from tests.conftest import greedy, run_to_completion


@pytest.fixture
def engine_for(tiny_models):
    engines = []

    def make(**overrides):
        settings = dict(kv_cache_memory=16 << 20, block_size=16)
        settings.update(overrides)
        engine = AsyncTorchEngine.from_config(EngineConfig(**settings), tiny_models("llama-gqa")[0])
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.core.bm.check_invariants(engine.core.live_sequences())
        assert engine.core.bm.num_used == 0, "blocks leaked"


async def collect(engine, request):
    tokens, outs = [], []
    async for out in engine.generate(request):
        outs.append(out)
        tokens += out.outputs[0].new_token_ids
    return tokens, outs


def test_streams_match_the_sync_core_and_run_concurrently(engine_for, tiny_models, make_engine):
    prompts = [list(range(3 + i, 30 + 3 * i)) for i in range(6)]
    expected = run_to_completion(
        make_engine(tiny_models("llama-gqa")[0]),
        [GenerationRequest(str(i), p, greedy(20, ignore_eos=True)) for i, p in enumerate(prompts)],
    )

    async def main():
        engine = engine_for()
        await engine.start()
        results = await asyncio.gather(
            *(collect(engine, GenerationRequest(str(i), p, greedy(20, ignore_eos=True))) for i, p in enumerate(prompts))
        )
        stats = engine.stats()
        await engine.shutdown()
        return results, stats

    results, stats = asyncio.run(main())
    for i, (tokens, outs) in enumerate(results):
        assert tokens == expected[str(i)][0]
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"
        assert outs[-1].timings.first_token is not None and outs[-1].timings.finished >= outs[-1].timings.first_token
    assert stats.generation_tokens == 6 * 20 and stats.num_running == 0


def test_breaking_out_of_the_stream_aborts_and_frees_blocks(engine_for):
    async def main():
        engine = engine_for()
        await engine.start()
        stream = engine.generate(GenerationRequest("long", list(range(3, 200)), greedy(500, ignore_eos=True)))
        async for out in stream:
            if out.outputs[0].num_generated >= 3:
                break
        await stream.aclose()
        for _ in range(100):  # the loop handles the abort at its next step
            if engine.stats().kv_blocks_used == 0 and engine.stats().num_running == 0:
                break
            await asyncio.sleep(0.01)
        stats = engine.stats()
        await engine.shutdown()
        return stats

    stats = asyncio.run(main())
    assert stats.kv_blocks_used == 0 and stats.num_running == 0


def test_abort_by_id_finishes_the_stream(engine_for):
    async def main():
        engine = engine_for()
        await engine.start()
        outs = []

        async def consume():
            async for out in engine.generate(GenerationRequest("a", list(range(3, 50)), greedy(900, ignore_eos=True))):
                outs.append(out)
                if len(outs) == 2:
                    await engine.abort("a")

        await asyncio.wait_for(consume(), 30)
        await engine.shutdown()
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"


def test_invalid_request_raises_and_dead_engine_refuses(engine_for):
    async def main():
        engine = engine_for()
        await engine.start()
        with pytest.raises(ValueError, match="maximum context length"):
            await collect(engine, GenerationRequest("x", [1, 2, 3], greedy(10**6)))
        await engine.shutdown()
        assert not engine.is_alive
        with pytest.raises(EngineDeadError):
            await collect(engine, GenerationRequest("y", [1, 2, 3], greedy(3)))

    asyncio.run(main())
