"""Constrained decoding with xgrammar: compiled grammars cached by constraint, a matcher per sequence, and
the token bitmask of a whole batch applied to its logits at once.

xgrammar over llguidance: bench/grammar_backends.py measured both on the default model's tokenizer (README,
"Structured outputs and tools"), and TensorRT-LLM's guided decoding uses xgrammar too, so both backends
accept the same grammars.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict

import torch
import xgrammar as xgr

from engines.base import StructuredOutput
from engines.structured_schema import check_json_schema
from engines.torch.kernels.token_mask import apply_token_bitmask

log = logging.getLogger("kiln.engine")

# Compiled grammars kept (least recently used dropped): each holds per-token masks of the whole vocabulary.
CACHE_ENTRIES = 256
COMPILE_THREADS = 1  # the other core keeps stepping
# JSON without free whitespace: a small model can otherwise emit blanks until max_tokens.
JSON_OPTIONS = {"any_whitespace": False}


class Grammars:
    """Compiles constraints for one tokenizer; thread-safe (the server compiles off the event loop, the step
    loop finds the result in the cache)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        info = _tokenizer_info(tokenizer, vocab_size, stop_token_ids)
        self._compiler = xgr.GrammarCompiler(info, max_threads=COMPILE_THREADS, cache_enabled=False)
        self.vocab_size = vocab_size
        self._cache: OrderedDict[StructuredOutput, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        """The compiled grammar of `spec`; ValueError (one sentence) when it is invalid or unsupported."""
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        compiled = self._compile(spec)
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        try:
            if spec.kind == "json":
                check_json_schema(json.loads(spec.value))
                return self._compiler.compile_json_schema(spec.value, **JSON_OPTIONS)
            if spec.kind == "json_object":
                return self._compiler.compile_json_schema('{"type": "object"}', **JSON_OPTIONS)
            if spec.kind == "regex":
                return self._compiler.compile_regex(spec.value)
            if spec.kind == "choice":
                return self._compiler.compile_grammar(choice_grammar(spec.choices))
            if spec.kind == "grammar":
                return self._compile_ebnf_or_lark(spec.value)
        except ValueError:
            raise
        except Exception as exc:  # xgrammar's own errors (RuntimeError, InvalidJSONError...) say what is wrong
            raise ValueError(f"The {spec.kind} constraint could not be compiled: {_first_line(exc)}") from None
        raise ValueError(f"Unknown structured output kind {spec.kind!r}.")

    def _compile_ebnf_or_lark(self, grammar: str) -> xgr.CompiledGrammar:
        """vLLM's guided_grammar takes EBNF (GBNF) and, from Outlines, Lark; try EBNF first."""
        try:
            return self._compiler.compile_grammar(grammar)
        except Exception as ebnf_error:  # noqa: BLE001 - reported if Lark fails as well
            try:
                return self._compiler.compile_lark(grammar)
            except Exception:  # noqa: BLE001
                raise ebnf_error from None

    def matcher(self, compiled: xgr.CompiledGrammar) -> xgr.GrammarMatcher:
        return xgr.GrammarMatcher(compiled)


def _tokenizer_info(tokenizer, vocab_size: int, stop_token_ids: list[int]) -> xgr.TokenizerInfo:
    """xgrammar's view of the vocabulary with the tokenizer's special tokens as special: from_huggingface finds
    none in a tokenizer loaded from GGUF, and would let `<|im_start|>` and the like appear inside JSON strings.
    xgrammar treats an empty token as special (never allowed, save the stop tokens)."""
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
    vocab = list(info.decoded_vocab)
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if added.special and token_id < len(vocab):
            vocab[token_id] = b""
    return xgr.TokenizerInfo(
        vocab,
        xgr.VocabType.RAW,
        vocab_size=vocab_size,
        stop_token_ids=stop_token_ids,
        add_prefix_space=info.add_prefix_space,
    )


def choice_grammar(choices: tuple[str, ...]) -> str:
    """EBNF whose root is exactly one of `choices` (JSON string escapes are EBNF string escapes)."""
    if not choices:
        raise ValueError("choice needs at least one string.")
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def fill_bitmask(rows: list[tuple[xgr.GrammarMatcher, list[int]] | None], vocab_size: int) -> torch.Tensor | None:
    """The allowed-token bitmask of every row ([R, ceil(vocab / 32)] int32), or None when no row has a
    grammar. A row is (matcher, tokens taken as already generated: the drafts before a verified position);
    a row without a grammar, or whose drafts leave the grammar (it is rejected before this position), allows
    every token."""
    if not any(rows):
        return None
    bitmask = xgr.allocate_token_bitmask(len(rows), vocab_size)  # all ones: every token allowed
    for i, row in enumerate(rows):
        if row is None:
            continue
        matcher, extra = row
        accepted = 0
        for token in extra:
            if not matcher.accept_token(token):
                break
            accepted += 1
        if accepted == len(extra) and not matcher.is_terminated():
            matcher.fill_next_token_bitmask(bitmask, i)
            if not bool(bitmask[i].any()):
                # a dead end (no token continues the grammar): end the output rather than sample from nothing
                log.warning("a grammar allows no next token; the output ends here")
                for token in matcher.stop_token_ids:
                    bitmask[i, token // 32] |= 1 << (token % 32)
        if accepted:
            matcher.rollback(accepted)
    return bitmask


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Disallowed tokens' logits become -inf in place; allowed ones are left exactly as they were."""
    apply_token_bitmask(logits, bitmask)
