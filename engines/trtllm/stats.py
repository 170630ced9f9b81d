"""TensorRT-LLM iteration stats (the dicts `LLM.get_stats_async()` yields, one per engine iteration; keys from
the executor's IterationStats and KvCacheStats JSON) folded into kiln's EngineStats, so /metrics shows the same
`kiln:` series whichever backend runs. Running and waiting requests are not taken from here: kiln counts its own
(engines/trtllm/engine.py), because these records arrive late and stop when the engine idles."""

from __future__ import annotations

from engines.base import EngineStats


def apply_iteration_stats(stats: EngineStats, iteration: dict) -> None:
    """The KV-cache gauges take the latest iteration's values; block reuse becomes prefix-cache tokens."""
    stats.num_steps += 1
    kv = iteration.get("kvCacheStats") or {}
    if "maxNumBlocks" in kv:
        stats.kv_blocks_total = int(kv["maxNumBlocks"])
    if "usedNumBlocks" in kv:
        stats.kv_blocks_used = int(kv["usedNumBlocks"])
    # KV-cache block reuse (enable_block_reuse): reused blocks hit, missed blocks missed; both are cumulative in
    # TensorRT-LLM, so the latest value replaces the last
    per_block = int(kv.get("tokensPerBlock", 0))
    if per_block and "reusedBlocks" in kv:
        reused, missed = int(kv["reusedBlocks"]), int(kv.get("missedBlocks", 0))
        stats.prefix_cache_hits = reused * per_block
        stats.prefix_cache_queries = (reused + missed) * per_block
