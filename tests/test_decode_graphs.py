"""DecodeGraphs (model_runner): decode steps padded to a bucket of batch sizes over static buffers, the
path CUDA graphs replay. Capture needs a GPU; here the same padded buffers run eagerly on CPU, wired the
way build_core wires them on CUDA (loader.decode_graphs patched on), and must decode exactly as the plain
path: same greedy tokens, logits equal up to batch-size-dependent GEMM rounding, nothing written to the
pool's blocks that the plain path does not write, the scratch block never in a block table.
"""

from __future__ import annotations

import dataclasses
import os

os.environ["TRITON_INTERPRET"] = "1"  # the Triton variant runs the CUDA kernel in Triton's interpreter

import pytest  # noqa: E402
import torch  # noqa: E402

from engines.base import GenerationRequest  # noqa: E402
from engines.config import EngineConfig  # noqa: E402
from engines.torch import loader, model_runner  # noqa: E402
from engines.torch.attention_backend import TRITON_ATTENTION  # noqa: E402
from engines.torch.model_runner import decode_buckets  # noqa: E402
from server.settings import ServerSettings  # noqa: E402
from tests.conftest import greedy, run_to_completion  # noqa: E402


def test_buckets():
    assert decode_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert decode_buckets(100) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 100]
    assert decode_buckets(5) == [1, 2, 4, 5]
    assert decode_buckets(1) == [1]


def test_graphs_follow_device_and_enforce_eager(tiny_models, make_engine, monkeypatch):
    assert loader.decode_graphs(EngineConfig(), torch.device("cuda"))
    assert not loader.decode_graphs(EngineConfig(enforce_eager=True), torch.device("cuda"))
    monkeypatch.setenv("KILN_ENFORCE_EAGER", "true")
    assert ServerSettings().engine_config().enforce_eager
    core = make_engine(tiny_models("llama-gqa")[0])  # CPU: the plain path, a pool without a scratch block
    assert core.runner.graphs is None and core.runner.kv_cache.scratch_block is None
    assert core.runner.kv_cache.data.shape[3] == core.bm.num_blocks


def _watch(core) -> dict:
    """Record each step's logits and the batch sizes DecodeGraphs ran; check the scratch block stays out of
    every scheduled block table and that only steps of single-token decode rows take the padded path."""
    seen = {"logits": [], "padded": [], "draft_padded": []}
    runner, graphs = core.runner, core.runner.graphs
    execute = runner.execute

    def spy(chunks):
        if graphs is not None:
            scratch = runner.kv_cache.scratch_block
            assert all(scratch not in c.seq.block_table for c in chunks)
            before = len(seen["padded"])
        result = execute(chunks)
        if graphs is not None:
            plain_decodes = all(c.num_query_tokens == 1 and c.seq.num_computed_tokens > 0 for c in chunks)
            assert (len(seen["padded"]) > before) == plain_decodes
        seen["logits"].append(result.logits)
        return result

    runner.execute = spy
    draft_graphs = getattr(getattr(core.proposer, "runner", None), "graphs", None)
    for key, watched in (("padded", graphs), ("draft_padded", draft_graphs)):
        if watched is not None:
            watched.run = lambda chunks, run=watched.run, key=key: seen[key].append(len(chunks)) or run(chunks)
    return seen


def _compare(
    tiny_models, make_engine, monkeypatch, name, prompts, max_tokens, arrivals=None, draft=False, **settings
) -> dict:
    loaded, _ = tiny_models(name)
    plain = make_engine(loaded, loaded if draft else None, **settings)
    monkeypatch.setattr(loader, "decode_graphs", lambda config, device: True)  # CUDA's wiring, on CPU
    padded = make_engine(loaded, loaded if draft else None, **settings)
    assert padded.runner.graphs is not None and padded.runner.kv_cache.scratch_block == padded.bm.num_blocks
    results = []
    for core in (plain, padded):
        seen = _watch(core)
        requests = [
            GenerationRequest(str(i), p, greedy(m, ignore_eos=True))
            for i, (p, m) in enumerate(zip(prompts, max_tokens))
        ]
        results.append((run_to_completion(core, requests, arrivals), seen))
    (tokens, plain_seen), (padded_tokens, padded_seen) = results
    assert padded_tokens == tokens
    assert len(padded_seen["logits"]) == len(plain_seen["logits"])
    for a, b in zip(plain_seen["logits"], padded_seen["logits"]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    # padding rows wrote the scratch block only: the pools' own blocks match the plain engine's
    n = plain.bm.num_blocks
    ours = padded.runner.kv_cache.data[:, :, :, :n].float()
    torch.testing.assert_close(ours, plain.runner.kv_cache.data.float(), rtol=1e-4, atol=1e-4)
    padding = any(size not in padded.runner.graphs.buckets for size in padded_seen["padded"])
    assert (padded.runner.kv_cache.data[:, :, :, n].float().abs().sum() > 0) == padding  # the scratch block
    return padded_seen


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("kv_cache_dtype", ["model", "fp8"])
@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-mha"])
def test_padded_decode_matches_plain(name, kv_cache_dtype, tiny_models, make_engine, monkeypatch):
    # 5 then 3 sequences of different lengths crossing block boundaries; the batch shrinks as they finish
    # (5, 4, 3, 2, 1: buckets 8, 4, 4, 2, 1); the later three arrive mid-run, so some steps mix a prefill
    # in and run plainly
    prompts = _prompts([5, 17, 33, 2, 40, 12, 1, 30])
    max_tokens = [20, 9, 14, 25, 6, 18, 11, 15]
    arrivals = {"5": 4, "6": 4, "7": 9}
    sizes = _compare(
        tiny_models, make_engine, monkeypatch, name, prompts, max_tokens, arrivals, kv_cache_dtype=kv_cache_dtype
    )["padded"]
    assert {3, 5, 7} & set(sizes) and {1, 2, 4} <= set(sizes)


def test_padded_decode_with_speculation(tiny_models, make_engine, monkeypatch):
    """The model drafts for itself (every draft accepted): verification steps (k + 1 rows per sequence) run
    plainly; the draft runner's decode steps, and the target's for a last token (nothing left to draft), padded."""
    # 1 token from the prefill, 4 per verification: each request has one token left to decode plainly
    seen = _compare(
        tiny_models,
        make_engine,
        monkeypatch,
        "llama-gqa",
        _prompts([6, 5, 7], seed=3),
        [10, 14, 6],
        draft=True,
        speculative_method="draft",
        num_speculative_tokens=3,
    )
    assert 3 in seen["draft_padded"] and seen["padded"]


def test_padded_decode_with_triton_kernel(tiny_models, make_engine, monkeypatch):
    """The attention a CUDA graph replays: the Triton kernel (interpreted), fed only the static tables and
    context lengths, on both engines' decode rows."""
    pytest.importorskip("triton")
    calls = []
    decode = TRITON_ATTENTION.decode_kernel
    triton = dataclasses.replace(TRITON_ATTENTION, decode_kernel=lambda *a: calls.append(1) or decode(*a))
    monkeypatch.setattr(model_runner, "select_attention_backend", lambda *args, **kw: triton)  # as on CUDA
    sizes = _compare(tiny_models, make_engine, monkeypatch, "llama-gqa", _prompts([3, 20, 9]), [10, 6, 8])["padded"]
    assert 3 in sizes and calls
