"""TensorRT-LLM iteration stats (the JSON dicts `LLM.get_stats()` returns, one per engine iteration;
keys from tensorrt_llm/executor: IterationStats, KvCacheStats, SpecDecodingStats) folded into kiln's
EngineStats, so /metrics shows the same `kiln:` series whichever backend runs."""

from __future__ import annotations

from engines.base import EngineStats


def apply_iteration_stats(stats: EngineStats, iteration: dict) -> None:
    """Gauges take the latest iteration's value; counters grow by what the iteration reports."""
    stats.num_running = int(iteration.get("numActiveRequests", stats.num_running))
    stats.num_waiting = int(iteration.get("numQueuedRequests", stats.num_waiting))
    stats.num_steps += 1
    kv = iteration.get("kvCacheStats") or {}
    if "maxNumBlocks" in kv:
        stats.kv_blocks_total = int(kv["maxNumBlocks"])
    if "usedNumBlocks" in kv:
        stats.kv_blocks_used = int(kv["usedNumBlocks"])
    spec = iteration.get("specDecodingStats") or {}
    if spec:
        stats.spec_num_drafts += int(spec.get("numRequestsWithDraftTokens", 0))
        stats.spec_draft_tokens += int(spec.get("numDraftTokens", 0))
        stats.spec_accepted_tokens += int(spec.get("numAcceptedTokens", 0))


def apply_prefix_reuse(stats: EngineStats, iteration: dict) -> None:
    """KV-cache block reuse (enable_block_reuse) as prefix-cache tokens: reused blocks hit, missed blocks
    missed; both are cumulative in TensorRT-LLM, so the latest value replaces the last."""
    kv = iteration.get("kvCacheStats") or {}
    per_block = int(kv.get("tokensPerBlock", 0))
    if per_block and "reusedBlocks" in kv:
        reused, missed = int(kv["reusedBlocks"]), int(kv.get("missedBlocks", 0))
        stats.prefix_cache_hits = reused * per_block
        stats.prefix_cache_queries = (reused + missed) * per_block
