"""A failure inside a step ends only the requests it belongs to; the step loop goes on. A device error
(or a fault that persists step after step) is fatal: the loop dies and every waiter learns it.
And the engine is warm before start() returns: kernels loaded, one request stepped through."""

import asyncio

import pytest

import engines.torch.llm_engine as llm_engine
from engines.base import EngineDeadError, GenerationRequest, RequestFailedError, SamplingParams
from engines.config import EngineConfig
from engines.torch import engine as torch_engine
from engines.torch.engine import MAX_CONSECUTIVE_STEP_FAILURES, AsyncTorchEngine
from engines.torch.kernels.registry import KERNELS
from tests.conftest import greedy, run_to_completion

POISON_TOP_K = 777  # the sampler below fails on rows with this top_k, as it did on a top_k of 2**63


@pytest.fixture
def engine(tiny_models):
    made = AsyncTorchEngine.from_config(
        EngineConfig(kv_cache_memory=16 << 20, block_size=16), tiny_models("llama-gqa")[0]
    )
    yield made
    assert made.core.bm.num_used == 0, "blocks leaked"


async def collect(engine, request):
    tokens = []
    async for out in engine.generate(request):
        tokens += out.outputs[0].new_token_ids
    return tokens


def poisoned_sampler(monkeypatch):
    real = llm_engine.sample

    def sample(logits, rows):
        if any(row.params.top_k == POISON_TOP_K for row in rows):
            raise ValueError("Overflow when unpacking long long")
        return real(logits, rows)

    monkeypatch.setattr(llm_engine, "sample", sample)


def test_a_request_that_breaks_sampling_fails_alone(engine, tiny_models, make_engine, monkeypatch):
    prompts = [list(range(3 + i, 40 + i)) for i in range(3)]
    expected = run_to_completion(
        make_engine(tiny_models("llama-gqa")[0]),
        [GenerationRequest(str(i), p, greedy(12, ignore_eos=True)) for i, p in enumerate(prompts)],
    )
    poisoned_sampler(monkeypatch)
    poison = SamplingParams(temperature=1.0, top_k=POISON_TOP_K, max_tokens=12, ignore_eos=True)

    async def main():
        await engine.start()
        results = await asyncio.gather(
            collect(engine, GenerationRequest("bad", list(range(5, 30)), poison)),
            *(
                collect(engine, GenerationRequest(str(i), p, greedy(12, ignore_eos=True)))
                for i, p in enumerate(prompts)
            ),
            return_exceptions=True,
        )
        alive = engine.is_alive
        after = await collect(engine, GenerationRequest("after", prompts[0], greedy(12, ignore_eos=True)))
        await engine.shutdown()
        return results, alive, after

    results, alive, after = asyncio.run(main())
    assert isinstance(results[0], RequestFailedError) and "Overflow" in str(results[0])
    assert results[1:] == [expected[str(i)][0] for i in range(3)]  # the others, token for token
    assert alive and after == expected["0"][0]


def test_a_failed_forward_fails_that_steps_requests_and_the_loop_goes_on(engine, monkeypatch):
    calls = {"n": 0}
    real = engine.core.runner.execute

    def execute(chunks):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("can't allocate memory (injected)")
        return real(chunks)

    async def main():
        await engine.start()
        monkeypatch.setattr(engine.core.runner, "execute", execute)
        with pytest.raises(RequestFailedError, match="can't allocate memory"):
            await collect(engine, GenerationRequest("first", list(range(3, 20)), greedy(4)))
        tokens = await collect(engine, GenerationRequest("second", list(range(3, 20)), greedy(4, ignore_eos=True)))
        await engine.shutdown()
        return tokens

    assert len(asyncio.run(main())) == 4


@pytest.mark.parametrize(
    "error, times",
    [
        (RuntimeError("CUDA error: an illegal memory access was encountered"), 1),
        (RuntimeError("a fault that does not go away"), MAX_CONSECUTIVE_STEP_FAILURES),
    ],
)
def test_device_errors_and_persistent_faults_kill_the_loop(engine, monkeypatch, error, times):
    def execute(chunks):
        raise error

    async def main():
        await engine.start()
        monkeypatch.setattr(engine.core.runner, "execute", execute)
        failures = []
        for i in range(times):
            try:
                await collect(engine, GenerationRequest(str(i), list(range(3, 20)), greedy(4)))
            except Exception as exc:  # noqa: BLE001 - the kinds are checked below
                failures.append(exc)
        await asyncio.sleep(0.1)
        alive = engine.is_alive
        await engine.shutdown()
        return failures, alive

    failures, alive = asyncio.run(main())
    assert not alive
    assert all(isinstance(f, RequestFailedError) for f in failures[:-1]) and isinstance(failures[-1], EngineDeadError)


def test_start_returns_warm(engine, monkeypatch):
    loaded = []
    for name, module in KERNELS.items():
        monkeypatch.setattr(module, "available", lambda name=name: loaded.append(name) or False)
    steps = []
    real_step = engine.core.step
    monkeypatch.setattr(engine.core, "step", lambda: steps.append(1) or real_step())

    async def main():
        await engine.start()
        ready_stats = engine.stats()
        await engine.shutdown()
        return ready_stats

    ready_stats = asyncio.run(main())
    assert set(loaded) == set(KERNELS)
    assert len(steps) >= torch_engine.WARM_UP_MAX_TOKENS  # prefill + decode steps before start() returned
    # the warm-up does not count as served work
    assert ready_stats.num_steps == 0 and ready_stats.generation_tokens == 0 and ready_stats.prompt_tokens == 0
