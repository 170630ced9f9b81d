"""Incremental detokenization that is right for multi-byte characters and merged tokens.

Decoding tokens one by one breaks characters split across byte-level tokens and spaces that
depend on the previous token. Instead the detokenizer decodes a short window of recent tokens
(seeded with the prompt's tail) and emits only the new suffix; a suffix ending in U+FFFD is an
incomplete character, so it is held back until the next token completes it (vLLM's scheme).
"""

from __future__ import annotations

from collections.abc import Sequence

PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0  # window start: tokens decoded for context only
        self.read_offset = len(self.token_ids)  # tokens before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly "")."""
        self.token_ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of generation, release text held back for an incomplete character."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read_offset >= len(self.token_ids):
            return ""
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            new_text = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.token_ids)
            return new_text
        return ""
