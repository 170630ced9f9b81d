"""Incremental detokenization and each choice's text pipeline, with the default model's tokenizer."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engines.base import CompletionOutput, TokenLogprob
from server.detokenize import IncrementalDetokenizer
from server.generation import ChoiceState


@pytest.fixture(scope="module")
def tokenizer():
    """The default model's tokenizer, read straight from its GGUF file (no model conversion)."""
    from transformers import AutoTokenizer

    from engines.model_source import default_model_path

    path = default_model_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def stream(tokenizer, token_ids, prompt_ids=()):
    detokenizer = IncrementalDetokenizer(tokenizer, list(prompt_ids))
    pieces = [detokenizer.add(t) for t in token_ids]
    pieces.append(detokenizer.flush())
    return pieces


def test_multibyte_characters_are_never_split(tokenizer):
    text = "héllo 世界 🤖 naïve — ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # some characters take several byte-level tokens
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_spaces_depend_on_the_prompt_context(tokenizer):
    prompt = tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    completion = tokenizer(" Paris, of course.", add_special_tokens=False)["input_ids"]
    assert "".join(stream(tokenizer, completion, prompt)) == " Paris, of course."


def test_special_tokens_are_skipped(tokenizer):
    ids = tokenizer("Hi there", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert "".join(stream(tokenizer, ids)) == "Hi there"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30))
def test_property_stream_equals_full_decode(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids, skip_special_tokens=True)


def test_choice_stops_mid_delta_and_counts_tokens_up_to_the_stop(tokenizer):
    ids = tokenizer("one two three four", add_special_tokens=False)["input_ids"]
    choice = ChoiceState(0, tokenizer, [], ["thr"], min_tokens=0)
    logprobs = [TokenLogprob(t, -0.5) for t in ids]
    delta = choice.process(CompletionOutput(0, ids, logprobs, len(ids)))
    assert delta.text == "one two "
    assert delta.finish_reason == "stop"
    assert choice.num_tokens == 3  # "one", " two", " three": the stop completes inside the third token
    assert len(delta.logprobs) == 3
    assert choice.process(CompletionOutput(0, [ids[0]], None, len(ids) + 1)) is None


def test_choice_releases_held_text_when_the_engine_finishes(tokenizer):
    ids = tokenizer("answer: fin", add_special_tokens=False)["input_ids"]
    choice = ChoiceState(0, tokenizer, [], ["final"], min_tokens=0)
    delta = choice.process(CompletionOutput(0, ids, None, len(ids), finish_reason="length"))
    assert (delta.text, delta.finish_reason) == ("answer: fin", "length")


def test_choice_omits_the_text_of_a_stop_token(tokenizer):
    ids = tokenizer("yes no", add_special_tokens=False)["input_ids"]
    choice = ChoiceState(0, tokenizer, [], [], min_tokens=0)
    delta = choice.process(CompletionOutput(0, ids, None, len(ids), finish_reason="stop", stop_token_id=ids[-1]))
    assert (delta.text, delta.finish_reason, choice.num_tokens) == ("yes", "stop", len(ids))


def test_stop_strings_wait_for_min_tokens(tokenizer):
    ids = tokenizer("a b a b", add_special_tokens=False)["input_ids"]
    choice = ChoiceState(0, tokenizer, [], ["b"], min_tokens=3)
    delta = choice.process(CompletionOutput(0, ids, None, len(ids)))
    assert delta.text == "a b a " and delta.finish_reason == "stop"
