"""`kiln serve --speculative-method ngram` through the openai SDK: greedy answers equal those of requests
that opt out with `speculative: false`, streaming carries several tokens per step, and /metrics and
/v1/metadata count the drafts."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.server.conftest import start_server

pytestmark = pytest.mark.slow

PARAGRAPH = (
    "The quick brown fox jumps over the lazy dog. The dog did not move, because it was asleep in the warm "
    "afternoon sun, and the fox ran on into the forest."
)
REWRITE = f"Rewrite this paragraph exactly, word for word:\n\n{PARAGRAPH}"
QUESTIONS = ["What is the capital of France?", "Name three primary colors.", REWRITE]


@pytest.fixture(scope="module")
def spec_server(tmp_path_factory):
    server = start_server(
        tmp_path_factory.mktemp("spec-server"),
        "--dtype",
        "float32",
        "--speculative-method",
        "ngram",
        "--num-speculative-tokens",
        "4",
        "--ngram-min",
        "2",
        "--ngram-max",
        "4",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(spec_server):
    from openai import OpenAI

    return OpenAI(base_url=f"{spec_server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def spec_counters(server) -> dict[str, float]:
    text = httpx.get(f"{server.base_url}/metrics").text
    return {
        name: float(value)
        for name, value in re.findall(r"^kiln:(spec_decode_\w+?)(?:_total)?\{[^}]*\} (\S+)$", text, re.M)
    }


def ask(client, question: str, speculative: bool = True, **kw):
    return client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": question}],
        max_tokens=48,
        temperature=0,
        extra_body={"ignore_eos": True, "speculative": speculative},
        **kw,
    )


def test_greedy_answers_equal_with_and_without_speculation(client, spec_server):
    before = spec_counters(spec_server)
    plain = [ask(client, q, speculative=False).choices[0].message.content for q in QUESTIONS]
    after_plain = spec_counters(spec_server)
    assert after_plain["spec_decode_num_draft_tokens"] == before["spec_decode_num_draft_tokens"], (
        "a request that opted out was drafted for"
    )
    speculative = [ask(client, q).choices[0].message.content for q in QUESTIONS]
    assert speculative == plain
    after = spec_counters(spec_server)
    assert after["spec_decode_num_accepted_tokens"] > after_plain["spec_decode_num_accepted_tokens"]
    assert "because it was asleep in the warm afternoon sun" in speculative[2]  # the model copies from the prompt


def test_streaming_under_speculation_equals_the_whole_answer(client):
    whole = ask(client, REWRITE).choices[0].message.content
    chunks = [c.choices[0].delta.content or "" for c in ask(client, REWRITE, stream=True) if c.choices]
    assert "".join(chunks) == whole
    assert len([c for c in chunks if c]) < 48, "accepted drafts should arrive several tokens per chunk"


def test_metrics_and_metadata_report_speculation(client, spec_server):
    ask(client, REWRITE)
    counters = spec_counters(spec_server)
    assert counters["spec_decode_num_draft_tokens"] >= counters["spec_decode_num_accepted_tokens"] > 0
    assert counters["spec_decode_num_drafts"] > 0
    assert 0 < counters["spec_decode_acceptance_rate"] <= 1
    meta = httpx.get(f"{spec_server.base_url}/v1/metadata").json()["speculative"]
    assert meta["method"] == "ngram" and meta["num_speculative_tokens"] == 4
    assert (meta["ngram_min"], meta["ngram_max"]) == (2, 4)
    assert meta["draft_tokens"] >= counters["spec_decode_num_draft_tokens"]
    assert meta["acceptance_rate"] == pytest.approx(meta["accepted_tokens"] / meta["draft_tokens"])
    assert meta["mean_accepted_length"] == pytest.approx(meta["accepted_tokens"] / meta["num_drafts"])
