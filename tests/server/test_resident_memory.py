"""Resident memory of the default server (issue #23): after warm-up and a few requests, once the step loop has
been idle long enough to hand freed heap back, a live `kiln serve` with no flags holds less than the bound, and
its KV pool is resident only for the blocks those requests wrote (not the 1 GiB it reserves).

A memory bound, not a timing; bench/rss.py measures the same phases with the breakdown and at concurrency 32."""

from __future__ import annotations

import time
from pathlib import Path

from openai import OpenAI

from bench.rss import memory
from engines.torch.engine import IDLE_RELEASE_S
from tests.server.conftest import CLEAN_EXIT, start_server

# Issue #23's goal: 1.0 GB (953 MiB) idle after warm-up. Measured 2026-12-07 on AMD EPYC Zen 4
# (docs/performance.md): 2068 MiB with a zero-filled KV pool, 1013 MiB with the pool resident as written, 727 MiB
# with the default's int8 weights (--quantization auto); 725 MiB on 2026-12-08 with the GGUF's Q4_1 blocks, whose
# codes an AVX512-BF16 CPU keeps twice (the panel layout, 66 MB). The bound is the goal itself; it catches a pool made
# resident again (+1 GiB) or a second copy of the dense weights.
IDLE_RSS_BOUND_MIB = 1e9 / 2**20
# Two short chats write a few dozen 16-token blocks: 30 layers x 2 x 3 heads x 2 KiB each, a few MiB.
IDLE_KV_RESIDENT_BOUND_MIB = 32


def test_default_server_idle_rss_is_bounded(tmp_path: Path):
    server = start_server(tmp_path)
    try:
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        for prompt in ("Name three colours.", "Write one sentence about the sea."):
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=16
            )
            assert reply.choices[0].message.content
        time.sleep(IDLE_RELEASE_S + 3)
        idle = memory(server.process.pid)
    finally:
        code = server.stop()
    assert code in CLEAN_EXIT, server.log()
    assert idle["kv_pool_size"] >= 512, f"no KV pool mapping found in smaps: {idle}"
    assert idle["kv"] <= IDLE_KV_RESIDENT_BOUND_MIB, idle
    assert idle["vm_rss"] <= IDLE_RSS_BOUND_MIB, idle
