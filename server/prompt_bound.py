"""Refuse a text prompt that cannot fit the context without tokenizing it.

Tokenizing a prompt of megabytes takes a core for tens of seconds, only to learn that it is too long.
For a byte-level BPE tokenizer without a normalizer (GPT-2, Llama 3, Qwen, SmolLM...) every byte of the
text ends up in some token and no token holds more characters than the longest vocabulary entry, so a
text longer than max_model_len x that length has more tokens than the context. Other tokenizers may drop
or merge characters (normalizers, whitespace pre-tokenizers); for them there is no such bound.
"""

from __future__ import annotations

import functools

from server.errors import bad_request


@functools.lru_cache(maxsize=8)
def max_token_chars(tokenizer) -> int | None:
    """The longest vocabulary entry in characters, where that bounds the characters per token; else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None or type(backend.decoder).__name__ != "ByteLevel":
        return None
    return max(map(len, tokenizer.get_vocab()))


def check_prompt_chars(tokenizer, num_chars: int, max_model_len: int, param: str) -> None:
    """400 (context_length_exceeded) for a text of `num_chars` that has more tokens than the context."""
    per_token = max_token_chars(tokenizer)
    if per_token is not None and num_chars > max_model_len * per_token:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, the {param} has "
            f"{num_chars} characters, which are more than {max_model_len} tokens (no token of this model holds "
            f"more than {per_token} characters). Please reduce the length of the {param}.",
            param=param,
            code="context_length_exceeded",
        )
