"""OpenAI-API conformance checks and a small timing against any running kiln server.

    python scripts/openai_checks.py --url http://127.0.0.1:8000 [--api-key K] [--json OUT]

Drives the server with the official `openai` SDK (and httpx for /metrics, /v1/metadata and the
health endpoints), prints one Markdown table (check, result, seconds, detail) and a timing table
(TTFT and output tok/s at concurrency 1 and 8, 64 tokens each), optionally writes JSON, and exits
1 if any check failed or no server answers. It knows nothing about the backend, so the same checks
run against the torch engine on a CPU and a TensorRT-LLM engine on a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai

# A story never ends within 16 tokens, so greedy answers end with finish_reason "length" without
# relying on the vLLM extension ignore_eos (kept for the timing, where it is what the contract says).
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
GREEDY_TOKENS = 16
TIMING_TOKENS = 64
TIMING_LEVELS = [(1, 3), (8, 8)]  # (concurrency, requests)
ABORT_TIMEOUT_S = 10.0  # "within a few seconds": one engine step, with room for a busy machine
METRICS = [
    "kiln:time_to_first_token_seconds",
    "kiln:generation_tokens_total",
    "kiln:num_requests_running",
    "kiln:kv_cache_usage_perc",
]


class CheckFailed(Exception):
    """A check's expectation did not hold; the message is the table's detail."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


@dataclass
class Context:
    """What the checks share: clients, and facts learned by earlier checks (model, greedy answer)."""

    url: str
    client: openai.OpenAI
    http: httpx.Client
    model: str | None = None
    max_model_len: int | None = None
    greedy_text: str | None = None
    greedy_usage: openai.types.CompletionUsage | None = None
    metadata: dict = field(default_factory=dict)
    timing: list[dict] = field(default_factory=list)

    def need_model(self) -> str:
        # Later checks cannot name a model when the models list failed; say so instead of a confusing 404.
        expect(self.model is not None, "skipped: needs the models list")
        return self.model

    def need_greedy(self) -> str:
        expect(self.greedy_text is not None, "skipped: needs the greedy chat answer")
        return self.greedy_text


# ---- helpers ----------------------------------------------------------------------------------
_SAMPLE = re.compile(r"^(kiln:[A-Za-z0-9_:]+)(?:\{[^}]*\})? (\S+)$", re.M)


def scrape(ctx: Context) -> dict[str, float]:
    """kiln:* samples of /metrics summed over labels (one model, so labels only split by reason)."""
    response = ctx.http.get("/metrics")
    expect(response.status_code == 200, f"/metrics answered {response.status_code}")
    samples: dict[str, float] = {}
    for name, value in _SAMPLE.findall(response.text):
        samples[name] = samples.get(name, 0.0) + float(value)
    return samples


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def check_envelope(response: httpx.Response, status: int) -> str:
    """The OpenAI error envelope, exactly: {"error": {message, type, param, code}}; returns the message."""
    expect(response.status_code == status, f"HTTP {response.status_code}, expected {status}: {response.text[:200]}")
    body = response.json()
    expect(isinstance(body, dict) and set(body) == {"error"}, f"body is not an error envelope: {body}")
    error = body["error"]
    expect(set(error) == {"message", "type", "param", "code"}, f"error fields {sorted(error)}")
    expect(isinstance(error["message"], str) and bool(error["message"]), "empty error message")
    return error["message"]


def greedy_chat(ctx: Context, **overrides):
    params = dict(model=ctx.need_model(), messages=STORY, max_tokens=GREEDY_TOKENS, temperature=0)
    return ctx.client.chat.completions.create(**(params | overrides))


# ---- the checks, in order (later ones use what earlier ones learned) ----------------------------
def check_models(ctx: Context) -> str:
    models = ctx.client.models.list().data
    expect(len(models) >= 1, "no models listed")
    ctx.model = models[0].id
    # max_model_len is kiln's (and vLLM's) extra field; the SDK keeps it, but read it raw to be sure.
    card = ctx.http.get("/v1/models").json()["data"][0]
    ctx.max_model_len = int(card["max_model_len"])
    return f"{ctx.model} (max_model_len {ctx.max_model_len})"


def check_chat_greedy(ctx: Context) -> str:
    # The answer the later checks compare with comes from a second, identical request: it meets the server's
    # prefix cache as they do. A bf16 server may answer the first, cache-cold request differently, since
    # recomputing only the prompt's uncached tail runs its matmuls at another row count, which rounds
    # differently (kiln's bf16 linears, like vLLM's, are not batch-invariant).
    greedy_chat(ctx)
    response = greedy_chat(ctx)
    expect(len(response.choices) == 1, f"{len(response.choices)} choices")
    choice = response.choices[0]
    expect(choice.message.role == "assistant", f"role {choice.message.role}")
    expect(bool(choice.message.content), "empty answer")
    expect(choice.finish_reason == "length", f"finish_reason {choice.finish_reason}, expected length")
    usage = response.usage
    expect(usage is not None, "no usage")
    expect(usage.prompt_tokens > 0, f"prompt_tokens {usage.prompt_tokens}")
    expect(usage.completion_tokens == GREEDY_TOKENS, f"completion_tokens {usage.completion_tokens}")
    expect(usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, f"total_tokens {usage.total_tokens}")
    ctx.greedy_text, ctx.greedy_usage = choice.message.content, usage
    return f"{usage.prompt_tokens}+{usage.completion_tokens} tokens: {choice.message.content!r}"


def check_chat_stream(ctx: Context) -> str:
    expected = ctx.need_greedy()
    chunks = list(greedy_chat(ctx, stream=True, stream_options={"include_usage": True}))
    expect(len({c.id for c in chunks}) == 1, "chunks carry different ids")
    content_chunks = [c for c in chunks if c.choices]
    expect(content_chunks[0].choices[0].delta.role == "assistant", "first delta has no assistant role")
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    expect(text == expected, f"streamed {text!r} != non-streamed {expected!r}")
    finishes = [c.choices[0].finish_reason for c in content_chunks if c.choices[0].finish_reason]
    expect(finishes == ["length"], f"finish reasons {finishes}")
    # include_usage: one last chunk with no choices and the usage, nothing after it.
    last = chunks[-1]
    expect(not last.choices and last.usage is not None, "no final usage chunk")
    expect(all(c.usage is None for c in chunks[:-1]), "usage on a chunk before the last")
    expect(
        last.usage.completion_tokens == ctx.greedy_usage.completion_tokens
        and last.usage.prompt_tokens == ctx.greedy_usage.prompt_tokens,
        f"usage {last.usage}",
    )
    return f"{len(chunks)} chunks, text and usage equal the non-streamed answer"


def check_completion_string(ctx: Context) -> str:
    response = ctx.client.completions.create(
        model=ctx.need_model(), prompt="The capital of France is", max_tokens=8, temperature=0
    )
    choice = response.choices[0]
    expect(bool(choice.text), "empty text")
    expect(choice.finish_reason in ("stop", "length"), f"finish_reason {choice.finish_reason}")
    expect(response.usage.prompt_tokens > 0 and 0 < response.usage.completion_tokens <= 8, f"usage {response.usage}")
    return repr(choice.text)


def check_completion_token_ids(ctx: Context) -> str:
    # The API has no tokenizer endpoint, so use ids every vocabulary of a thousand tokens or more has;
    # what matters is that the server counts exactly these as the prompt.
    vocab = int(ctx.http.get("/v1/metadata").json().get("vocab_size", 1000))
    ids = [i for i in (100, 200, 300, 400, 500) if i < vocab]
    response = ctx.client.completions.create(model=ctx.need_model(), prompt=ids, max_tokens=8, temperature=0)
    expect(len(response.choices) == 1, f"{len(response.choices)} choices")
    finish = response.choices[0].finish_reason
    expect(finish in ("stop", "length"), f"finish_reason {finish}")
    expect(response.usage.prompt_tokens == len(ids), f"prompt_tokens {response.usage.prompt_tokens} != {len(ids)}")
    expect(response.usage.completion_tokens >= 1, "no completion tokens")
    return f"prompt {ids} -> {response.choices[0].text!r}"


def check_n2(ctx: Context) -> str:
    response = greedy_chat(ctx, n=2, max_tokens=8, temperature=0.8, seed=1)
    expect(sorted(c.index for c in response.choices) == [0, 1], f"choice indexes {[c.index for c in response.choices]}")
    expect(all(c.message.content for c in response.choices), "a choice is empty")
    tokens = response.usage.completion_tokens
    expect(tokens == 16, f"completion_tokens {tokens}, expected 2 x 8 (usage counts every choice)")
    return " / ".join(repr(c.message.content) for c in response.choices)


def check_logprobs(ctx: Context) -> str:
    response = greedy_chat(ctx, max_tokens=4, logprobs=True, top_logprobs=2)
    logprobs = response.choices[0].logprobs
    content = (logprobs.content if logprobs else None) or []
    expect(
        len(content) == response.usage.completion_tokens,
        f"{len(content)} logprob entries for {response.usage.completion_tokens} tokens",
    )
    for entry in content:
        expect(len(entry.top_logprobs) == 2, f"{len(entry.top_logprobs)} top_logprobs for {entry.token!r}")
        expect(entry.logprob <= 0, f"logprob {entry.logprob} > 0")
        # Greedy picks the most likely token, so none of the alternatives may be (noticeably) likelier.
        best = max(t.logprob for t in entry.top_logprobs)
        expect(entry.logprob >= best - 1e-2, f"greedy token {entry.token!r} ({entry.logprob:.3f}) below top {best:.3f}")
    return ", ".join(f"{e.token!r}:{e.logprob:.2f}" for e in content)


def check_stop_string(ctx: Context) -> str:
    # Take a word from the second half of the greedy answer as the stop string: the stopped answer must
    # then be the greedy answer up to the word's first occurrence, without it, whatever the model says.
    expected_full = ctx.need_greedy()
    words = expected_full.split()
    words = [w.strip(".,;:!?\"'") for w in words[max(1, len(words) // 2) :]]
    stop = next((w for w in words if len(w) >= 3 and expected_full.index(w) > 0), None)
    expect(stop is not None, f"no usable stop word in {expected_full!r}")
    response = greedy_chat(ctx, stop=[stop])
    choice = response.choices[0]
    expected = expected_full[: expected_full.index(stop)]
    expect(choice.finish_reason == "stop", f"finish_reason {choice.finish_reason}, expected stop")
    expect(choice.message.content == expected, f"{choice.message.content!r} != {expected!r}")
    return f"stop {stop!r} -> {choice.message.content!r}"


def check_context_too_long(ctx: Context) -> str:
    body = {"model": ctx.need_model(), "messages": STORY, "max_tokens": ctx.max_model_len}
    message = check_envelope(ctx.http.post("/v1/chat/completions", json=body), 400)
    expect("context length" in message, f"message does not mention the context length: {message}")
    return message[:120]


def check_unknown_model(ctx: Context) -> str:
    try:
        ctx.client.chat.completions.create(model="no-such-model", messages=STORY, max_tokens=4)
    except openai.NotFoundError:
        pass
    else:
        raise CheckFailed("the SDK got no NotFoundError")
    body = {"model": "no-such-model", "messages": STORY, "max_tokens": 4}
    return check_envelope(ctx.http.post("/v1/chat/completions", json=body), 404)[:120]


def check_stream_abort(ctx: Context) -> str:
    running = lambda: scrape(ctx).get("kiln:num_requests_running", 0.0)  # noqa: E731
    expect(wait_until(lambda: running() == 0, ABORT_TIMEOUT_S), "requests still running before the check")
    max_tokens = max(1, min(1000, ctx.max_model_len - 200))
    stream = greedy_chat(ctx, max_tokens=max_tokens, stream=True, extra_body={"ignore_eos": True})
    for _ in zip(range(5), stream):  # a few chunks: the request is decoding now
        pass
    seen_running = running()
    expect(seen_running >= 1, "kiln:num_requests_running is 0 while a stream is decoding")
    stream.close()  # drops the connection, as a client that gives up would
    closed = time.monotonic()
    expect(
        wait_until(lambda: running() == 0, ABORT_TIMEOUT_S),
        f"kiln:num_requests_running still {running()} {ABORT_TIMEOUT_S:.0f} s after the client closed",
    )
    freed_s = time.monotonic() - closed
    after = greedy_chat(ctx, max_tokens=4)
    expect(bool(after.choices[0].message.content), "no answer after the abort")
    return f"running {seen_running:.0f} while streaming, 0 after {freed_s:.2f} s; next request answered"


def check_metrics(ctx: Context) -> str:
    text = ctx.http.get("/metrics").text
    missing = [m for m in METRICS if not re.search(rf"^{re.escape(m)}(_bucket|_sum|_count)?[{{ ]", text, re.M)]
    expect(not missing, f"missing {missing}")
    generated = scrape(ctx).get("kiln:generation_tokens_total", 0.0)
    expect(generated > 0, "kiln:generation_tokens_total is 0 after the checks generated tokens")
    return f"{len(METRICS)} metrics present; generation_tokens_total {generated:.0f}"


def check_metadata(ctx: Context) -> str:
    response = ctx.http.get("/v1/metadata")
    expect(response.status_code == 200, f"HTTP {response.status_code}")
    ctx.metadata = response.json()
    for key in ("backend", "precision"):
        expect(isinstance(ctx.metadata.get(key), str) and bool(ctx.metadata[key]), f"no {key}")
    return (
        f"backend {ctx.metadata['backend']}, precision {ctx.metadata['precision']}, "
        f"kv {ctx.metadata.get('kv_cache_dtype')}, hardware {ctx.metadata.get('hardware')}"
    )


# ---- timing ------------------------------------------------------------------------------------
async def timed_request(client: openai.AsyncOpenAI, model: str, i: int) -> dict:
    started = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Write a long story about the sea, number {i}."}],
        max_tokens=TIMING_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    finished = time.perf_counter()
    return {"ttft_s": (first or finished) - started, "tokens": tokens}


async def timed_level(ctx: Context, api_key: str, concurrency: int, requests: int) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{ctx.url}/v1", api_key=api_key, max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> dict:
        async with gate:
            return await timed_request(client, ctx.model, i)

    async with client:
        started = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - started
    ttft = [r["ttft_s"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": requests,
        "max_tokens": TIMING_TOKENS,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_max_s": max(ttft),
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tok_per_s": tokens / wall,
        "short": [r["tokens"] for r in results if r["tokens"] != TIMING_TOKENS],
    }


def check_timing(ctx: Context, api_key: str) -> str:
    ctx.need_model()
    asyncio.run(timed_level(ctx, api_key, 1, 1))  # warm-up: first-request costs are not the steady state
    for concurrency, requests in TIMING_LEVELS:
        level = asyncio.run(timed_level(ctx, api_key, concurrency, requests))
        ctx.timing.append(level)
        # ignore_eos means every request must produce exactly TIMING_TOKENS tokens.
        expect(not level["short"], f"c={concurrency}: requests produced {level['short']} tokens, not {TIMING_TOKENS}")
    return ", ".join(f"c={t['concurrency']}: {t['output_tok_per_s']:.1f} tok/s" for t in ctx.timing)


CHECKS: list[tuple[str, Callable[[Context], str]]] = [
    ("models list", check_models),
    ("chat greedy + usage", check_chat_greedy),
    ("chat stream == non-stream, usage chunk", check_chat_stream),
    ("completions: string prompt", check_completion_string),
    ("completions: token-id prompt", check_completion_token_ids),
    ("n=2", check_n2),
    ("chat logprobs, top_logprobs=2", check_logprobs),
    ("stop string", check_stop_string),
    ("max_tokens beyond context -> 400", check_context_too_long),
    ("unknown model -> 404", check_unknown_model),
    ("client closes stream -> aborted", check_stream_abort),
    ("/metrics names", check_metrics),
    ("/v1/metadata backend, precision", check_metadata),
]


# ---- running and reporting ---------------------------------------------------------------------
def run_check(name: str, func: Callable[[], str]) -> dict:
    started = time.perf_counter()
    try:
        ok, detail = True, func()
    except CheckFailed as exc:
        ok, detail = False, str(exc)
    except Exception as exc:  # an SDK error, a dropped connection: the check failed, the others still run
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    return {"check": name, "ok": ok, "seconds": round(time.perf_counter() - started, 3), "detail": detail}


def cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")  # one line, no column breaks
    return text if len(text) <= limit else text[: limit - 1] + "…"


def print_tables(results: list[dict], timing: list[dict]) -> None:
    print("| check | result | seconds | detail |\n|---|---|---:|---|")
    for r in results:
        print(f"| {r['check']} | {'PASS' if r['ok'] else 'FAIL'} | {r['seconds']:.2f} | {cell(r['detail'])} |")
    if timing:
        print(
            "\n| concurrency | requests | max_tokens | TTFT p50 s | TTFT max s | output tok/s |\n"
            "|---:|---:|---:|---:|---:|---:|"
        )
        for t in timing:
            print(
                f"| {t['concurrency']} | {t['requests']} | {t['max_tokens']} | {t['ttft_p50_s']:.3f} | "
                f"{t['ttft_max_s']:.3f} | {t['output_tok_per_s']:.1f} |"
            )


@contextlib.contextmanager
def connected(url: str, api_key: str | None, wait_s: float, prog: str) -> Iterator[tuple[httpx.Client, openai.OpenAI]]:
    """httpx and openai clients of the server at `url` once it is ready; exit 1 with one sentence when it is not."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=300) as http:
        problem = server_answers(http, wait_s)
        if problem:
            print(f"{prog}: {problem}; start `kiln serve` or pass --url.", file=sys.stderr)
            raise SystemExit(1)
        # max_retries=0: a retry would hide exactly the failures these checks look for; the SDK insists on a key,
        # which kiln ignores without --api-key
        with openai.OpenAI(base_url=f"{url}/v1", api_key=api_key or "none", max_retries=0, timeout=300) as client:
            yield http, client


def print_summary(results: list[dict]) -> list[str]:
    """Print how many checks passed and which failed; return the failed ones' names."""
    failed = [r["check"] for r in results if not r["ok"]]
    summary = f"{len(results) - len(failed)}/{len(results)} checks passed"
    print(f"\n{summary}; failed: {', '.join(failed)}" if failed else f"\n{summary}")
    return failed


def server_answers(http: httpx.Client, wait_s: float) -> str | None:
    """None when /v1/health/ready says 200 (within wait_s), else why not, in one sentence."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            status = http.get("/v1/health/ready").status_code
            problem = None if status == 200 else f"the server at {http.base_url} is not ready (HTTP {status})"
        except httpx.TransportError as exc:
            problem = f"no server answers at {http.base_url} ({type(exc).__name__}: {exc})"
        if problem is None or time.monotonic() >= deadline:
            return problem
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default %(default)s)")
    parser.add_argument("--api-key", default=None, help="the server's --api-key, if it has one")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--wait", type=float, default=0, help="seconds to wait for /v1/health/ready (default 0)")
    parser.add_argument("--no-timing", action="store_true", help="skip the timing (faster)")
    args = parser.parse_args(argv)
    url = args.url.rstrip("/")
    with connected(url, args.api_key, args.wait, "openai_checks") as (http, client):
        ctx = Context(url=url, client=client, http=http)
        results = [run_check(name, lambda f=func: f(ctx)) for name, func in CHECKS]
        if not args.no_timing:
            results.append(
                run_check(
                    f"timing c=1 x{TIMING_LEVELS[0][1]}, c=8 x{TIMING_LEVELS[1][1]}",
                    lambda: check_timing(ctx, args.api_key or "none"),
                )
            )

    print_tables(results, ctx.timing)
    failed = print_summary(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "url": url,
                    "metadata": ctx.metadata,
                    "checks": results,
                    "timing": ctx.timing,
                    "passed": len(results) - len(failed),
                    "failed": len(failed),
                },
                indent=2,
            )
            + "\n"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
