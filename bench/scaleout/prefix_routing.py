"""Scenario (b): vllm-router in front of the replicas, `--policy cache_aware` against `round_robin` on a
prefix-heavy workload, judged by kiln's own prefix-cache counters.

Honest sizing: with a large KV pool every replica keeps every prefix and both policies hit alike. Here each
replica's pool (KV_CACHE_MEMORY) holds PREFIXES / 2 prefixes and the blocks of the running requests, not all
PREFIXES: round_robin sends every prefix to both replicas, so each keeps evicting prefixes it will need again
(least recently used first); cache_aware keeps each prefix on one replica, so the pair holds them all. The
table shows the pool size in tokens next to the prompt length.

vllm-router's cache_aware policy matches prefixes by token: it tokenizes each chat on the workers (POST
/v1/chat/completions/render, which kiln does not have, then vLLM's /tokenize, which kiln has), so those calls show
in the replicas' logs; they do not touch the prefix cache.

Each policy gets fresh prefixes (other seeds) on the same replicas: blocks the previous policy left behind match
nothing and are evicted like any cold block, so the two runs start equally cold.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import httpx

from bench.event_loop import words
from bench.scaleout import load
from bench.scaleout.launcher import require_binary, start_service
from bench.scaleout.replicas import Replica, free_port, start_replicas, stop_replicas

POLICIES = ("round_robin", "cache_aware")
PREFIXES = 6
PREFIX_WORDS = 95  # about 135 tokens: with the chat template, 10 KV blocks of 16 per prompt
REQUESTS_PER_PREFIX = 5
CONCURRENCY = 2  # few running requests: their own blocks must not crowd the prefixes out
MAX_TOKENS = 8
KV_CACHE_MEMORY = "14MiB"  # 39 blocks of 16 tokens: 3 prefixes and the running requests, not 6
QUESTIONS = ("Summarize it.", "Name its topic.", "Give it a title.", "What is the first word?", "Is it long?")


def prefix_texts(seed: int) -> list[str]:
    rng = random.Random(seed)
    vocabulary = words()
    return [f"Document {seed}-{i}: " + " ".join(rng.choices(vocabulary, k=PREFIX_WORDS)) for i in range(PREFIXES)]


def workload(seed: int) -> list[list[dict]]:
    """Every prefix REQUESTS_PER_PREFIX times with different questions, shuffled: round_robin must not line a
    prefix up with one replica by accident."""
    requests = [
        [{"role": "user", "content": f"{doc}\n\nQuestion {n}: {QUESTIONS[n % len(QUESTIONS)]}"}]
        for doc in prefix_texts(seed)
        for n in range(REQUESTS_PER_PREFIX)
    ]
    random.Random(seed).shuffle(requests)
    return requests


def counters(replicas: list[Replica]) -> dict[str, tuple[float, float]]:
    samples = {r.name: r.metrics() for r in replicas}
    return {
        name: (m["kiln:prefix_cache_queries_total"], m["kiln:prefix_cache_hits_total"]) for name, m in samples.items()
    }


async def send(router_url: str, model: str, requests: list[list[dict]]) -> list[load.Outcome]:
    api = load.client(router_url)
    calls = [lambda m=messages: load.chat(api, model, m, MAX_TOKENS, stream=False) for messages in requests]
    outcomes = await load.bounded(calls, CONCURRENCY)
    await api.close()
    return outcomes


def run_policy(policy: str, seed: int, replicas: list[Replica], model: str, work_dir: Path) -> dict:
    port = free_port()
    command = [
        require_binary("vllm-router"),
        *("--host", "127.0.0.1", "--port", str(port), "--policy", policy),
        *("--worker-urls", *(r.url for r in replicas)),
        *("--health-check-endpoint", "/v1/health/ready", "--log-level", "warning"),
        # its own metrics listener, on a free port: the default one is fixed, and taken by any other router
        *("--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())),
    ]
    url = f"http://127.0.0.1:{port}"
    router = start_service(f"vllm-router {policy}", command, work_dir / f"vllm-router-{policy}.log", f"{url}/health")
    try:
        before = counters(replicas)
        started = time.monotonic()
        outcomes = asyncio.run(send(url, model, workload(seed)))
        wall = time.monotonic() - started
        after = counters(replicas)
    finally:
        router.stop()
    per_replica = {
        name: {"queries": after[name][0] - before[name][0], "hits": after[name][1] - before[name][1]} for name in after
    }
    queries = sum(r["queries"] for r in per_replica.values())
    hits = sum(r["hits"] for r in per_replica.values())
    failures = [o for o in outcomes if not o.ok]
    return {
        "policy": policy,
        "requests": len(outcomes),
        "failed": len(failures),
        "failure_examples": [o.error for o in failures[:5]],
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(outcomes) / wall, 3),
        "prompt_tokens_per_s": round(sum(o.prompt_tokens for o in outcomes) / wall, 1),
        "mean_prompt_tokens": round(sum(o.prompt_tokens for o in outcomes) / len(outcomes), 1),
        "prefix_cache_queries": queries,
        "prefix_cache_hits": hits,
        "hit_rate": round(hits / queries, 4) if queries else 0.0,
        "per_replica": per_replica,
    }


def run(work_dir: Path, log_dir: Path) -> dict:
    replicas = start_replicas(2, log_dir / "prefix-routing", "--kv-cache-memory", KV_CACHE_MEMORY)
    try:
        model = httpx.get(f"{replicas[0].url}/v1/models", timeout=10).json()["data"][0]["id"]
        capacity = int(replicas[0].metrics()["kiln:kv_cache_capacity_tokens"])
        runs = [run_policy(policy, seed, replicas, model, work_dir) for seed, policy in enumerate(POLICIES)]
    finally:
        stop_replicas(replicas)
    return {
        "kv_cache_memory": KV_CACHE_MEMORY,
        "kv_capacity_tokens_per_replica": capacity,
        "prefixes": PREFIXES,
        "prefix_words": PREFIX_WORDS,
        "requests_per_prefix": REQUESTS_PER_PREFIX,
        "concurrency": CONCURRENCY,
        "max_tokens": MAX_TOKENS,
        "policies": runs,
    }


def table(result: dict) -> str:
    lines = [
        f"(b) vllm-router, {result['prefixes']} prefixes x {result['requests_per_prefix']} requests (about "
        f"{result['policies'][0]['mean_prompt_tokens']:.0f} prompt tokens each), concurrency {result['concurrency']}; "
        f"KV pool {result['kv_cache_memory']} = {result['kv_capacity_tokens_per_replica']} tokens per replica",
        "",
        "| policy | prefix-cache hit rate | hits / queries (tokens) | requests/s | prompt tokens/s | failed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['policy']} | {r['hit_rate']:.1%} | {r['prefix_cache_hits']:.0f} / {r['prefix_cache_queries']:.0f} | "
        f"{r['requests_per_s']:.2f} | {r['prompt_tokens_per_s']:.0f} | {r['failed']} |"
        for r in result["policies"]
    ]
    return "\n".join(lines)


def plot(result: dict, ax) -> None:
    policies = [r["policy"] for r in result["policies"]]
    ax.bar(policies, [r["hit_rate"] for r in result["policies"]], color=["grey", "tab:green"])
    for x, r in enumerate(result["policies"]):
        ax.text(x, r["hit_rate"], f"{r['hit_rate']:.1%}\n{r['requests_per_s']:.2f} req/s", ha="center", va="bottom")
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("kiln prefix-cache hit rate (tokens)")
    ax.set_title(f"(b) vllm-router, KV pool {result['kv_capacity_tokens_per_replica']} tokens/replica")
