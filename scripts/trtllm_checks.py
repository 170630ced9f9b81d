"""The serving behaviours issue #22 found broken on TensorRT-LLM, checked over HTTP against any running kiln server.

    python scripts/trtllm_checks.py --url http://127.0.0.1:8000 [--logprobs served|refused] [--only a,b] [--json OUT]

Each check drives the server with the official `openai` SDK (httpx for /metrics and /tokenize) and prints one
Markdown row (check | result | figure): streamed deltas add up to the answer, a stop token id and the finish
reasons, ignore_eos runs to max_tokens, an abandoned stream is cancelled in the engine, n=2 sampled choices, a
prompt longer than TensorRT-LLM's default max_input_len (1024), running/waiting/KV figures while streams decode, and
logprobs (served, or refused in one sentence by an engine built without `--gather-logits`). The same checks run
against kiln's torch engine on a CPU (tests/server/test_trtllm_checks_script.py), so a failure on the GPU is the
TensorRT-LLM path's. Exits 1 if any check failed or no server answers. scripts/gpu-check-trtllm.sh runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
from openai_checks import cell, check_envelope, connected, expect, print_summary, run_check, scrape, wait_until

# A question the default model answers in a few tokens and then ends (EOS), and a request that never ends early.
SHORT = [{"role": "user", "content": "What color is the sky on a clear day? Answer with one word."}]
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
LONG_PROMPT_TOKENS = 1024  # TensorRT-LLM's BuildConfig.max_input_len default: a longer prompt needs a deliberate one
SETTLE_S = 10.0  # an abandoned stream's slot and KV blocks are free again within this


@dataclass
class Ctx:
    client: openai.OpenAI
    http: httpx.Client
    model: str


def chat(ctx: Ctx, messages=STORY, **overrides):
    return ctx.client.chat.completions.create(
        **({"model": ctx.model, "messages": messages, "max_tokens": 32, "temperature": 0} | overrides)
    )


def metric(ctx: Ctx, name: str) -> float:
    return scrape(ctx).get(f"kiln:{name}", 0.0)


def idle(ctx: Ctx) -> None:
    expect(wait_until(lambda: metric(ctx, "num_requests_running") == 0, SETTLE_S), "requests still running before")


# ---- the checks ------------------------------------------------------------------------------------------------
def check_stream_diffs(ctx: Ctx) -> str:
    """TensorRT-LLM streams token_ids_diff per step; their text must add up to the non-streamed answer.

    A first request puts the prompt in the prefix cache, so the two compared are computed alike (cached prefix, then
    the same tail): a cache hit may legitimately change a greedy answer at a near-tie (the tail's sums run in
    another order than the whole prompt's), and that is not what this check is about."""
    chat(ctx, max_tokens=1)
    whole = chat(ctx, max_tokens=48)
    pieces, usage = [], None
    for chunk in chat(ctx, max_tokens=48, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        pieces += [c.delta.content for c in chunk.choices if c.delta.content]
    text = "".join(pieces)
    expect(text == whole.choices[0].message.content, f"streamed {text!r} != {whole.choices[0].message.content!r}")
    expect(usage is not None, "no usage chunk with stream_options.include_usage")
    expect(
        usage.completion_tokens == whole.usage.completion_tokens,
        f"streamed usage {usage.completion_tokens} != {whole.usage.completion_tokens}",
    )
    return f"{usage.completion_tokens} tokens in {len(pieces)} deltas, identical to the non-streamed answer"


def check_stop_token(ctx: Ctx) -> str:
    """stop_token_ids: the answer ends before the first occurrence of a token it would generate."""
    full = chat(ctx, max_tokens=24).choices[0].message.content
    ids = ctx.http.post("/tokenize", json={"model": ctx.model, "prompt": full, "add_special_tokens": False})
    expect(ids.status_code == 200, f"/tokenize answered {ids.status_code}")
    tokens = ids.json()["tokens"]
    at = next((i for i in range(3, len(tokens)) if tokens[i] not in tokens[:i]), None)
    expect(at is not None, f"no token of {full!r} to stop at")
    stopped = chat(ctx, max_tokens=24, extra_body={"stop_token_ids": [tokens[at]]}).choices[0]
    expect(stopped.finish_reason == "stop", f"finish_reason {stopped.finish_reason}, expected stop")
    content = stopped.message.content
    expect(full.startswith(content) and len(content) < len(full), f"{content!r} is not a shorter prefix of {full!r}")
    return f"stop at token {tokens[at]} (position {at}): {content!r}"


def check_finish_reasons(ctx: Ctx) -> str:
    natural = chat(ctx, SHORT, max_tokens=64).choices[0]
    expect(natural.finish_reason == "stop", f"the short answer ended with {natural.finish_reason}, expected stop (EOS)")
    cut = chat(ctx, max_tokens=4)
    expect(cut.choices[0].finish_reason == "length", f"max_tokens 4 ended with {cut.choices[0].finish_reason}")
    expect(cut.usage.completion_tokens == 4, f"{cut.usage.completion_tokens} tokens for max_tokens 4")
    return f"EOS -> stop ({natural.message.content!r}); max_tokens 4 -> length"


def check_ignore_eos(ctx: Ctx) -> str:
    natural = chat(ctx, SHORT, max_tokens=64)
    expect(natural.usage.completion_tokens < 40, f"the short answer took {natural.usage.completion_tokens} tokens")
    forced = chat(ctx, SHORT, max_tokens=40, extra_body={"ignore_eos": True})
    choice = forced.choices[0]
    expect(forced.usage.completion_tokens == 40, f"{forced.usage.completion_tokens} tokens with ignore_eos, not 40")
    expect(choice.finish_reason == "length", f"finish_reason {choice.finish_reason}, expected length")
    return f"{natural.usage.completion_tokens} tokens to EOS; 40 of 40 with ignore_eos"


def check_abort(ctx: Ctx) -> str:
    """A client that closes its stream cancels the request in the engine: the slot and its KV blocks free up."""
    idle(ctx)
    kv_before = metric(ctx, "kv_cache_usage_perc")
    stream = chat(ctx, max_tokens=2000, stream=True, extra_body={"ignore_eos": True})
    for _ in zip(range(5), stream):
        pass
    running, kv = metric(ctx, "num_requests_running"), metric(ctx, "kv_cache_usage_perc")
    expect(running >= 1, "kiln:num_requests_running is 0 while a stream decodes")
    stream.close()
    closed = time.monotonic()
    expect(wait_until(lambda: metric(ctx, "num_requests_running") == 0, SETTLE_S), "still running after the close")
    freed_s = time.monotonic() - closed
    expect(
        wait_until(lambda: metric(ctx, "kv_cache_usage_perc") <= kv_before, SETTLE_S),
        f"KV usage {metric(ctx, 'kv_cache_usage_perc'):.4f} stays above {kv_before:.4f} after the close",
    )
    after = chat(ctx, max_tokens=4).choices[0]
    expect(bool(after.message.content), "no answer after the abort")
    return f"running {running:.0f} -> 0 in {freed_s:.2f} s, KV {kv:.2%} -> {metric(ctx, 'kv_cache_usage_perc'):.2%}"


def check_n2_sampled(ctx: Ctx) -> str:
    response = chat(ctx, n=2, temperature=1.0, top_p=0.95, max_tokens=16, seed=7)
    choices = sorted(response.choices, key=lambda c: c.index)
    expect([c.index for c in choices] == [0, 1], f"choice indexes {[c.index for c in response.choices]}")
    expect(all(c.message.content for c in choices), "a choice is empty")
    expect(response.usage.completion_tokens <= 32, f"usage {response.usage.completion_tokens} for 2 x 16")
    same = choices[0].message.content == choices[1].message.content
    return f"{response.usage.completion_tokens} tokens; choices {'identical' if same else 'differ'}"


def check_long_prompt(ctx: Ctx) -> str:
    paragraph = "The keeper climbed the stairs of the lighthouse, counted the ships and wrote each name down. "
    text = paragraph * 90
    count = ctx.http.post("/tokenize", json={"model": ctx.model, "prompt": text}).json()["count"]
    expect(count > LONG_PROMPT_TOKENS * 1.25, f"the prompt is only {count} tokens")
    messages = [{"role": "user", "content": text + "How many ships did he count?"}]
    response = chat(ctx, messages, max_tokens=8)
    expect(response.usage.prompt_tokens > LONG_PROMPT_TOKENS, f"prompt_tokens {response.usage.prompt_tokens}")
    expect(bool(response.choices[0].message.content), "empty answer")
    return f"{response.usage.prompt_tokens} prompt tokens answered"


def check_stats_while_streaming(ctx: Ctx) -> str:
    """/metrics running, waiting and KV usage move while streams decode (the trtllm backend's come from its stats)."""
    idle(ctx)
    streams = 4

    def consume() -> None:
        for _ in chat(ctx, max_tokens=160, stream=True, extra_body={"ignore_eos": True}):
            pass

    workers = [threading.Thread(target=consume, daemon=True) for _ in range(streams)]
    for worker in workers:
        worker.start()
    peak = {"num_requests_running": 0.0, "num_requests_waiting": 0.0, "kv_cache_usage_perc": 0.0}
    while any(worker.is_alive() for worker in workers):
        samples = scrape(ctx)
        for name in peak:
            peak[name] = max(peak[name], samples.get(f"kiln:{name}", 0.0))
        time.sleep(0.05)
    for worker in workers:
        worker.join()
    expect(peak["num_requests_running"] >= 1, "kiln:num_requests_running stayed 0 while 4 streams decoded")
    expect(peak["kv_cache_usage_perc"] > 0, "kiln:kv_cache_usage_perc stayed 0 while 4 streams decoded")
    expect(wait_until(lambda: metric(ctx, "num_requests_running") == 0, SETTLE_S), "running did not return to 0")
    return (
        f"peak running {peak['num_requests_running']:.0f}, waiting {peak['num_requests_waiting']:.0f}, "
        f"KV {peak['kv_cache_usage_perc']:.2%}; running 0 after"
    )


def check_logprobs_served(ctx: Ctx) -> str:
    """top_logprobs 0 still returns the chosen token's logprob (OpenAI's meaning), 3 returns three alternatives."""
    figures = []
    for top in (0, 3):
        response = chat(ctx, max_tokens=6, logprobs=True, top_logprobs=top)
        content = (response.choices[0].logprobs.content if response.choices[0].logprobs else None) or []
        expect(len(content) == response.usage.completion_tokens, f"top {top}: {len(content)} logprob entries")
        for entry in content:
            expect(entry.logprob <= 0, f"logprob {entry.logprob} > 0 for {entry.token!r}")
            expect(len(entry.top_logprobs) == top, f"top {top}: {len(entry.top_logprobs)} alternatives")
        figures.append(f"top {top}: {content[0].token!r} {content[0].logprob:.3f}" if content else f"top {top}: -")
    return "; ".join(figures)


def check_logprobs_refused(ctx: Ctx) -> str:
    """An engine built without --gather-logits cannot return logprobs: one sentence, HTTP 400, before the engine."""
    body = {"model": ctx.model, "messages": STORY, "max_tokens": 4, "logprobs": True, "top_logprobs": 1}
    message = check_envelope(ctx.http.post("/v1/chat/completions", json=body), 400)
    expect("\n" not in message, f"not one sentence: {message!r}")
    return message


CHECKS: dict[str, tuple[str, Callable[[Ctx], str]]] = {
    "stream": ("streamed deltas add up", check_stream_diffs),
    "stop_token": ("stop token id", check_stop_token),
    "finish": ("finish reasons", check_finish_reasons),
    "ignore_eos": ("ignore_eos to max_tokens", check_ignore_eos),
    "abort": ("abort cancels in the engine", check_abort),
    "n2": ("n=2 sampled", check_n2_sampled),
    "long_prompt": (f"prompt > {LONG_PROMPT_TOKENS} tokens", check_long_prompt),
    "stats": ("stats while streaming", check_stats_while_streaming),
    "logprobs": ("logprobs", check_logprobs_served),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default %(default)s)")
    parser.add_argument("--api-key", default=None, help="the server's --api-key, if it has one")
    parser.add_argument(
        "--logprobs",
        choices=("served", "refused"),
        default="served",
        help="what the engine does with logprobs: served, or refused (built without --gather-logits)",
    )
    parser.add_argument("--only", help=f"comma-separated checks to run, of {', '.join(CHECKS)} (default: all)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--wait", type=float, default=0, help="seconds to wait for /v1/health/ready (default 0)")
    args = parser.parse_args(argv)
    chosen = args.only.split(",") if args.only else list(CHECKS)
    unknown = [key for key in chosen if key not in CHECKS]
    if unknown:
        parser.error(f"unknown checks {unknown}; choose from {', '.join(CHECKS)}")
    checks = dict(CHECKS)
    if args.logprobs == "refused":
        checks["logprobs"] = ("logprobs refused without --gather-logits", check_logprobs_refused)
    url = args.url.rstrip("/")
    with connected(url, args.api_key, args.wait, "trtllm_checks") as (http, client):
        ctx = Ctx(client, http, client.models.list().data[0].id)
        results = [run_check(checks[key][0], lambda f=checks[key][1]: f(ctx)) for key in chosen]

    print("| check | result | figure |\n|---|---|---|")
    for r in results:
        print(f"| {r['check']} | {'PASS' if r['ok'] else 'FAIL'} | {cell(r['detail'])} |")
    failed = print_summary(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"url": url, "checks": results, "failed": len(failed)}, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
