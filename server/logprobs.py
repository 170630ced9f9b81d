"""Logprobs in OpenAI's two shapes (chat: per-token objects; completions: parallel lists)."""

from __future__ import annotations

from transformers.convert_slow_tokenizer import bytes_to_unicode

from engines.base import TokenLogprob
from server.protocol import ChatTokenLogprob, CompletionLogprobs, PromptLogprobs, PromptTokenLogprob, TopLogprob

# JSON has no -inf; OpenAI and vLLM report impossible tokens with a large negative number instead.
MIN_LOGPROB = -9999.0


class TokenStrings:
    """The text and raw bytes of single tokens, cached per token id.

    A byte-level BPE token may hold part of a UTF-8 character, so its bytes come from the
    tokenizer's byte alphabet rather than from decoding (which would give U+FFFD).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            text = self.tokenizer.decode([token_id])
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and piece and all(char in self._byte_of for char in piece):
                raw = list(bytes(self._byte_of[char] for char in piece))
            else:
                raw = list(text.encode("utf-8"))
            hit = self._cache[token_id] = (text, raw)
        return hit

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]


def _clamp(logprob: float) -> float:
    return max(float(logprob), MIN_LOGPROB)


def chat_logprobs(entries: list[TokenLogprob], top_k: int, strings: TokenStrings) -> list[ChatTokenLogprob]:
    result = []
    for entry in entries:
        text, raw = strings.get(entry.token_id)
        top = []
        for token_id, logprob in entry.top[:top_k]:
            top_text, top_raw = strings.get(token_id)
            top.append(TopLogprob(token=top_text, logprob=_clamp(logprob), bytes=top_raw))
        result.append(ChatTokenLogprob(token=text, logprob=_clamp(entry.logprob), bytes=raw, top_logprobs=top))
    return result


def completion_logprobs(
    entries: list[TokenLogprob], top_k: int, strings: TokenStrings, text_offset: int
) -> tuple[CompletionLogprobs, int]:
    """The completions-API logprobs of `entries`, whose text starts at `text_offset` in the choice;
    also returns the offset after them."""
    out = CompletionLogprobs()
    for entry in entries:
        text = strings.text(entry.token_id)
        out.tokens.append(text)
        out.token_logprobs.append(_clamp(entry.logprob))
        out.text_offset.append(text_offset)
        text_offset += len(text)
        if top_k:
            top = {strings.text(token_id): _clamp(logprob) for token_id, logprob in entry.top[:top_k]}
            top.setdefault(text, _clamp(entry.logprob))
            out.top_logprobs.append(top)
        else:
            out.top_logprobs.append(None)
    return out, text_offset


def echoed_prompt_logprobs(
    prompt_ids: list[int], entries: list[TokenLogprob | None], top_k: int, strings: TokenStrings
) -> tuple[CompletionLogprobs, int]:
    """An echoed prompt's logprobs in the completions shape (its first token has none: null), and the text
    offset after it."""
    out, offset = CompletionLogprobs(), 0
    for token_id, entry in zip(prompt_ids, entries):
        if entry is None:
            text = strings.text(token_id)
            out.tokens.append(text)
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            out.text_offset.append(offset)
            offset += len(text)
            continue
        one, offset = completion_logprobs([entry], top_k, strings, offset)
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(out, name).extend(getattr(one, name))
    return out, offset


def vllm_prompt_logprobs(entries: list[TokenLogprob | None], strings: TokenStrings) -> PromptLogprobs:
    """vLLM's prompt_logprobs: for each prompt token after the first, itself and its top alternatives by token id."""
    result: PromptLogprobs = []
    for entry in entries:
        if entry is None:
            result.append(None)
            continue
        tokens = {
            str(entry.token_id): PromptTokenLogprob(
                logprob=_clamp(entry.logprob), rank=entry.rank, decoded_token=strings.text(entry.token_id)
            )
        }
        for rank, (token_id, logprob) in enumerate(entry.top, start=1):
            tokens.setdefault(
                str(token_id),
                PromptTokenLogprob(logprob=_clamp(logprob), rank=rank, decoded_token=strings.text(token_id)),
            )
        result.append(tokens)
    return result
