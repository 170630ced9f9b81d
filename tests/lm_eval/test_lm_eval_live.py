"""lm-evaluation-harness 0.4.13 against a live float32 kiln: the local multiple-choice task through
`local-completions` (prompt scoring: echo + logprobs + max_tokens 1) and the local short-answer task through
`local-chat-completions`. Every request must be answered, and the scores lm_eval gets from kiln must equal
what Hugging Face transformers computes in float32 for the same tokens."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from engines.model_source import resolve_model
from tests.server.conftest import CLEAN_EXIT, start_server

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
REPO = HERE.parents[1]
CHECKED_DOCS = 5  # documents (4 choices each) whose log-likelihoods are recomputed with transformers
# The whole tasks take ~7 minutes on 2 CPU cores; bench/lm_eval_accuracy.py runs them in full.
MC_LIMIT, GEN_LIMIT = 12, 6


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # float32 so that kiln's log-likelihoods can match transformers' float32 ones to 1e-3
    live = start_server(tmp_path_factory.mktemp("lm-eval"), "--dtype", "float32")
    yield live
    code = live.stop()
    assert code in CLEAN_EXIT, f"kiln serve exited with {code} after SIGTERM:\n{live.log()}"


@pytest.fixture
def evaluate(server, monkeypatch):
    """lm_eval.simple_evaluate on one local task against `server`; returns (results, samples)."""
    import httpx
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(REPO)  # the task YAMLs' data_files are relative to the working directory
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    name = httpx.get(f"{server.base_url}/v1/models").json()["data"][0]["id"]

    def run(task: str, model: str, endpoint: str, limit: int, **kwargs):
        # num_concurrent > 1 takes lm_eval's async path, which raises once retries are spent; the
        # synchronous path would record a failed request as a missing answer and go on.
        model_args = dict(
            model=name, base_url=f"{server.base_url}{endpoint}", num_concurrent=2, max_retries=1, **kwargs
        )
        out = lm_eval.simple_evaluate(
            model=model,
            model_args=model_args,
            tasks=[task],
            task_manager=TaskManager(include_path=str(HERE)),
            log_samples=True,
            limit=limit,
            apply_chat_template=model == "local-chat-completions",
        )
        return out["results"][task], out["samples"][task]

    return run


def test_multiple_choice_through_local_completions_matches_transformers(evaluate):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(None)
    # token ids on the wire: lm_eval's context lengths and kiln's prompt are then the same tokens
    results, samples = evaluate(
        "kiln_mc",
        "local-completions",
        "/v1/completions",
        MC_LIMIT,
        tokenizer=str(folder),
        tokenizer_backend="huggingface",
        tokenized_requests=True,
    )
    assert 0 <= results["acc,none"] <= 1
    assert len(samples) == MC_LIMIT
    for sample in samples:
        assert len(sample["resps"]) == 4
        assert all(math.isfinite(ll) and ll < 0 for [(ll, _greedy)] in sample["resps"]), sample

    tokenizer = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for sample in samples[:CHECKED_DOCS]:
        for (context, continuation), [(kiln_ll, _greedy)] in zip(sample["arguments"], sample["resps"]):
            # lm_eval's TemplateLM._encode_pair: the continuation is what the whole adds to the context
            # (neither side has trailing/leading whitespace to move in this task)
            context_ids = tokenizer(context, add_special_tokens=False).input_ids
            whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
            with torch.no_grad():
                logprobs = hf(torch.tensor([whole])).logits[0].log_softmax(-1)
            hf_ll = sum(logprobs[i - 1, whole[i]].item() for i in range(len(context_ids), len(whole)))
            assert kiln_ll == pytest.approx(hf_ll, abs=1e-3), (context, continuation)


def test_generate_until_through_local_chat_completions(evaluate):
    results, samples = evaluate(
        "kiln_gen", "local-chat-completions", "/v1/chat/completions", GEN_LIMIT, tokenized_requests=False
    )
    assert 0 <= results["exact_match,first_number"] <= 1
    assert len(samples) == GEN_LIMIT
    assert all(isinstance(text, str) for sample in samples for text in sample["resps"][0]), samples
