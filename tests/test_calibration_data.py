"""Chat-request sets for `kiln build`: the shipped calibration and evaluation sets parse, are big,
disjoint and varied like production chat traffic; broken files fail with one sentence naming the
file and line; sample selection, rendering through a chat template and fingerprinting behave."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engines.calibration import (
    CALIBRATION_DIR,
    DEFAULT_SAMPLES,
    MAX_SAMPLES,
    MIN_SAMPLES,
    CalibrationDataError,
    default_calibration_path,
    default_eval_path,
    fingerprint,
    load_chat_requests,
    render_prompts,
    select_samples,
)


@pytest.fixture(scope="module")
def calib():
    return load_chat_requests(CALIBRATION_DIR / "calib.jsonl")


@pytest.fixture(scope="module")
def evals():
    return load_chat_requests(CALIBRATION_DIR / "eval.jsonl")


def user_texts(messages) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "user"]


def words(messages) -> int:
    return sum(len(m["content"].split()) for m in messages)


def share(requests, predicate) -> float:
    return sum(1 for r in requests if predicate(r)) / len(requests)


def first_sentence(text: str) -> str:
    return text.split("\n")[0].split(". ")[0]


def is_multi_turn(messages) -> bool:
    return len(user_texts(messages)) > 1


# --- the shipped files ---------------------------------------------------------------------------


def test_default_paths_point_at_the_shipped_files(monkeypatch, tmp_path):
    monkeypatch.delenv("KILN_CALIBRATION_DIR", raising=False)
    assert default_calibration_path() == CALIBRATION_DIR / "calib.jsonl"
    assert default_eval_path() == CALIBRATION_DIR / "eval.jsonl"
    assert default_calibration_path().is_file() and default_eval_path().is_file()
    monkeypatch.setenv("KILN_CALIBRATION_DIR", str(tmp_path))
    assert default_calibration_path() == tmp_path / "calib.jsonl"
    assert default_eval_path() == tmp_path / "eval.jsonl"


def test_shipped_sets_are_big_enough(calib, evals):
    assert len(calib) >= 520 > DEFAULT_SAMPLES
    assert len(evals) >= 128


@pytest.mark.parametrize("name", ["calib.jsonl", "eval.jsonl"])
def test_shipped_lines_are_plain_openai_chat_requests(name):
    for number, line in enumerate((CALIBRATION_DIR / name).read_text(encoding="utf-8").splitlines(), 1):
        record = json.loads(line)
        assert list(record) == ["messages"], f"line {number}"
        roles = [m["role"] for m in record["messages"]]
        body = roles[1:] if roles[0] == "system" else roles
        # user, assistant, user, ...: the shape chat templates accept, ending on the user's turn.
        assert body == ["user", "assistant"] * (len(body) // 2) + ["user"], f"line {number}: {roles}"
        assert all(m["content"].strip() == m["content"] and m["content"] for m in record["messages"]), number


def test_no_duplicate_prompts_within_a_set(calib, evals):
    for requests in (calib, evals):
        texts = [t for r in requests for t in user_texts(r)]
        assert len(texts) == len(set(texts))


def test_eval_shares_no_prompt_with_calib(calib, evals):
    calib_texts = {t.lower() for r in calib for t in user_texts(r)}
    eval_texts = {t.lower() for r in evals for t in user_texts(r)}
    assert not calib_texts & eval_texts
    # The same opening instruction would mean the same task with only the payload renamed.
    assert not {first_sentence(t) for t in calib_texts} & {first_sentence(t) for t in eval_texts}


@pytest.mark.parametrize("which, min_openings", [("calib", 80), ("evals", 40)])
def test_sets_are_varied_like_chat_traffic(request, which, min_openings):
    requests = request.getfixturevalue(which)
    openings = {" ".join(user_texts(r)[0].lower().split()[:4]) for r in requests}
    assert len(openings) >= min_openings
    assert 0.10 <= share(requests, lambda r: r[0]["role"] == "system") <= 0.22
    assert 0.06 <= share(requests, is_multi_turn) <= 0.15
    assert 0.12 <= share(requests, lambda r: 100 <= words(r) <= 300) <= 0.30
    assert share(requests, lambda r: 10 <= words(r) <= 60) >= 0.45
    assert max(words(r) for r in requests) <= 300


@pytest.mark.parametrize("which, min_count", [("calib", 20), ("evals", 5)])
def test_sets_hold_non_ascii_translation_prompts(request, which, min_count):
    requests = request.getfixturevalue(which)
    scripts = {"latin": 0, "cjk": 0}
    for r in requests:
        text = " ".join(m["content"] for m in r)
        if "ranslat" not in text and "raduc" not in text and "bersetz" not in text:
            continue
        scripts["latin"] += any(c in text for c in "éèàçñüöäßáó")
        scripts["cjk"] += any("\u3040" <= c <= "\u9fff" for c in text)
    assert scripts["latin"] + scripts["cjk"] >= min_count
    assert scripts["latin"] >= 2 and scripts["cjk"] >= 2


def test_sets_cover_the_task_kinds(calib):
    text = "\n".join(m["content"] for r in calib for m in r)
    for marker in (
        "def ",
        "SELECT",
        "fn ",
        "function ",
        "#!/bin/bash",
        "JSON",
        "CSV",
        "table",
        "poem",
        "email",
        "Summarise",
        "Translate",
        "step by step",
        "Pretend",
        "Brainstorm",
    ):
        assert marker in text, marker


# --- load_chat_requests ---------------------------------------------------------------------------


def write_lines(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}]})


def test_accepts_messages_and_prompt_lines_and_ignores_extra_keys(tmp_path):
    path = write_lines(
        tmp_path,
        json.dumps(
            {
                "model": "kiln",
                "temperature": 0.2,
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Why is the sky blue?", "name": "ada"},
                ],
            }
        ),
        "",
        "   ",
        json.dumps({"prompt": "Tell me a joke."}),
    )
    assert load_chat_requests(path) == [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}],
        [{"role": "user", "content": "Tell me a joke."}],
    ]


BAD_LINES = {
    "invalid json": '{"messages": [',
    "not an object": '["user", "hi"]',
    "neither messages nor prompt": '{"model": "kiln"}',
    "messages not a list": '{"messages": "hi"}',
    "empty messages": '{"messages": []}',
    "message not an object": '{"messages": ["hi"]}',
    "unknown role": '{"messages": [{"role": "tool", "content": "hi"}]}',
    "missing role": '{"messages": [{"content": "hi"}]}',
    "non-string content": '{"messages": [{"role": "user", "content": ["hi"]}]}',
    "missing content": '{"messages": [{"role": "user"}]}',
    "non-string prompt": '{"prompt": 42}',
}


@pytest.mark.parametrize("bad", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_bad_line_fails_with_one_sentence_naming_file_and_line(tmp_path, bad):
    path = write_lines(tmp_path, GOOD, "", bad, GOOD)
    with pytest.raises(CalibrationDataError) as caught:
        load_chat_requests(path)
    message = str(caught.value)
    assert str(path) in message and "line 3" in message
    assert "\n" not in message and message.endswith(".")


def test_missing_unreadable_and_empty_files_fail_with_one_sentence(tmp_path):
    cases = [tmp_path / "absent.jsonl", tmp_path, write_lines(tmp_path, "", "  ")]
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    cases.append(binary)
    for path in cases:
        with pytest.raises(CalibrationDataError) as caught:
            load_chat_requests(path)
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    assert isinstance(caught.value, ValueError)


# --- select_samples -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [MIN_SAMPLES - 1, 0, -5, MAX_SAMPLES + 1])
def test_sample_count_out_of_range_is_refused(n):
    with pytest.raises(CalibrationDataError, match=rf"^--calib-samples must be between 16 and 4096, got {n}\.$"):
        select_samples(list(range(10_000)), n)


def test_fewer_requests_than_asked_uses_them_all():
    requests = list(range(20))
    assert select_samples(requests, DEFAULT_SAMPLES) == requests
    assert select_samples(requests, 20) == requests


def test_selection_is_a_deterministic_seeded_subset_in_file_order():
    requests = [f"request {i}" for i in range(600)]
    chosen = select_samples(requests, 100, seed=7)
    assert len(chosen) == len(set(chosen)) == 100
    assert chosen == sorted(chosen, key=requests.index)
    assert chosen == select_samples(requests, 100, seed=7)
    assert chosen != select_samples(requests, 100, seed=8)
    assert select_samples(requests, MIN_SAMPLES) and len(select_samples(requests, MIN_SAMPLES)) == MIN_SAMPLES


# --- render_prompts -------------------------------------------------------------------------------


class BatchEncodingTokenizer:
    """Stands in for newer transformers, whose apply_chat_template returns a dict-like BatchEncoding."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and tokenize
        return {"input_ids": list(range(10 * len(messages))), "attention_mask": [1] * 10 * len(messages)}


def test_render_takes_input_ids_from_a_batch_encoding():
    requests = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}] * 3]
    assert render_prompts(requests, BatchEncodingTokenizer(), max_tokens=25) == [list(range(10)), list(range(25))]


@pytest.fixture(scope="module")
def default_tokenizer():
    from transformers import AutoTokenizer

    from engines.model_source import resolve_model

    # The tokenizer alone: the folder is the converted default model, no weights are loaded.
    return AutoTokenizer.from_pretrained(resolve_model(None))


@pytest.mark.slow
def test_render_with_the_default_models_chat_template(calib, default_tokenizer):
    requests = select_samples(calib, MIN_SAMPLES, seed=3) + [r for r in calib if words(r) > 150][:4]
    short, capped = render_prompts(requests, default_tokenizer, 4096), render_prompts(requests, default_tokenizer, 64)
    assert len(short) == len(capped) == len(requests)
    assert all(ids and all(isinstance(i, int) for i in ids) for ids in short)
    assert all(len(ids) == min(64, len(full)) for ids, full in zip(capped, short))
    assert all(ids == full[:64] for ids, full in zip(capped, short))
    assert any(len(full) > 64 for full in short)
    # The chat template wraps the text, so the prompt is longer than the user's text alone.
    bare = default_tokenizer(requests[0][-1]["content"])["input_ids"]
    assert len(short[0]) > len(bare)


# --- fingerprint ----------------------------------------------------------------------------------


def test_fingerprint_follows_the_content():
    requests = [[{"role": "user", "content": "one"}], [{"role": "user", "content": "two"}]]
    same = [[{"content": "one", "role": "user"}], [{"content": "two", "role": "user"}]]
    changed = [[{"role": "user", "content": "one"}], [{"role": "user", "content": "two!"}]]
    digest = fingerprint(requests)
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert fingerprint(same) == digest
    assert fingerprint(changed) != digest
    assert fingerprint(requests[::-1]) != digest
    assert fingerprint(requests[:1]) != digest
