"""bench/serve.py, the load generator: its metrics follow vLLM's definitions, and a short run against the
live server measures what the server produced (a benchmark's numbers are never asserted, only its counts)."""

from __future__ import annotations

import math

import pytest

from bench.serve import RequestResult, benchmark, make_prompts, markdown, summarize


def test_metrics_follow_vllms_definitions():
    results = [
        RequestResult(True, prompt_tokens=10, output_tokens=5, ttft=0.1, e2e=0.5, itl=[0.1, 0.1, 0.1, 0.1]),
        RequestResult(True, prompt_tokens=10, output_tokens=1, ttft=0.3, e2e=0.3, itl=[]),
        RequestResult(False, error="HTTP 500"),
    ]
    out = summarize(results, duration=2.0, goodput={"ttft": 200})
    assert (out["completed"], out["failed"], out["errors"]) == (2, 1, ["HTTP 500"])
    assert out["output_throughput"] == 3.0 and out["request_throughput"] == 1.0
    assert out["total_token_throughput"] == 13.0
    assert math.isclose(out["mean_tpot_ms"], 100.0)  # (0.5 - 0.1) / (5 - 1); one-token requests have none
    assert math.isclose(out["p50_itl_ms"], 100.0) and math.isclose(out["p50_ttft_ms"], 200.0)
    assert out["goodput"] == 0.5  # one of two requests had TTFT <= 200 ms, over 2 s


def test_prompts_have_the_asked_token_length():
    from transformers import AutoTokenizer

    from bench.serve import default_tokenizer

    tok = AutoTokenizer.from_pretrained(default_tokenizer())
    prompts = make_prompts(tok, 6, 64)
    assert len(set(prompts)) == 6
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert all(abs(n - 64) <= 2 for n in lengths), lengths  # decoding then re-encoding may merge a token


@pytest.mark.slow
def test_a_short_run_against_the_live_server(live_server):
    doc = benchmark(
        live_server.base_url,
        input_len=32,
        output_len=8,
        concurrency=[1, 3],
        num_prompts=3,
        goodput={"ttft": 60_000},
        label="kiln",
        api_key=live_server.api_key,
    )
    assert [lv["value"] for lv in doc["levels"]] == [1, 3]
    for lv in doc["levels"]:
        assert (lv["completed"], lv["failed"]) == (3, 0)
        assert lv["mean_output_tokens"] == 8  # ignore_eos: exactly max_tokens each
        assert abs(lv["mean_prompt_tokens"] - 32) <= 2
        assert 0 < lv["p50_ttft_ms"] <= lv["p50_e2el_ms"] and lv["goodput"] == lv["request_throughput"]
    assert "| kiln | c=3 |" in markdown([doc])
