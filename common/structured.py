"""Structured output (`response_format` json_object / json_schema) as a token mask in the sampling step.

llguidance compiles a JSON schema to a grammar and, per step, gives the set of tokens that keep the output a
prefix of a matching document (a bitmask, tens of microseconds per token on CPU). Both services that sample use
it: the prefill instance for the first token, the decode instance for the rest (its matcher first replays the
prefill's token). Tokens outside the mask get -inf before the sampler runs, as in vLLM; once the document is
complete only EOS is allowed.
"""
from __future__ import annotations

import json
import logging
import threading
from typing import Any

import torch
from llguidance import LLMatcher, LLTokenizer
from llguidance.hf import from_tokenizer

log = logging.getLogger(__name__)
JSON_OBJECT_SCHEMA = '{"type": "object"}'  # response_format json_object: any JSON object
# Compact JSON with OpenAI-style separators: free whitespace lets small models loop on spaces and newlines.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """The schema cannot be compiled to a grammar."""


def schema_text(schema: dict[str, Any] | None) -> str:
    """The schema as the services receive it (json_object: any object)."""
    return JSON_OBJECT_SCHEMA if schema is None else json.dumps(schema, sort_keys=True)


def check_schema(schema: str) -> None:
    """GrammarError naming the problem when the JSON schema cannot become a grammar."""
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as error:
        raise GrammarError(f"invalid JSON schema: {error}") from None
    problem = LLMatcher.validate_grammar(grammar)
    if problem:
        raise GrammarError(f"invalid JSON schema: {problem}")


class GrammarCompiler:
    """Matchers for JSON schemas over one model's vocabulary. Building the token table takes seconds for a 50k
    vocabulary on CPU: services start it in the background at start-up (`warm_up_in_background`), otherwise the
    first structured request builds it."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int) -> None:
        self._hf_tokenizer, self.vocab_size = hf_tokenizer, vocab_size
        self._tokenizer: LLTokenizer | None = None
        self._lock = threading.Lock()

    def warm_up_in_background(self) -> None:
        def warm_up() -> None:
            try:
                self._token_table()
            except GrammarError as error:
                log.warning("%s", error)

        threading.Thread(target=warm_up, name="grammar-warm-up", daemon=True).start()

    def _token_table(self) -> LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                try:
                    self._tokenizer = from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size)
                except ValueError as error:  # e.g. a slow (pure Python) tokenizer
                    raise GrammarError(f"structured output is unavailable with this tokenizer: {error}") from None
            return self._tokenizer

    def matcher(self, schema: str, replay: list[int] = ()) -> LLMatcher:
        """A matcher at the start of the output, after `replay` (tokens already generated)."""
        grammar = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        matcher = LLMatcher(self._token_table(), grammar, log_level=0)
        if replay:
            matcher.consume_tokens(list(replay))
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return matcher


def mask_logits(logits: torch.Tensor, matchers: list[LLMatcher | None]) -> torch.Tensor:
    """-inf on every token a row's matcher does not allow (rows without a matcher are left alone)."""
    rows = [i for i, matcher in enumerate(matchers) if matcher is not None]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    words = torch.zeros(len(rows), (vocab + 31) // 32, dtype=torch.int32)
    for j, i in enumerate(rows):
        matchers[i].unsafe_compute_mask_ptr(words[j].data_ptr(), words[j].numel() * words[j].element_size())
    bits = (words[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1  # little-endian bit order
    allowed = bits.reshape(len(rows), -1)[:, :vocab].bool().to(logits.device)
    logits = logits.clone()
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
    return logits


def advance(matchers: list[LLMatcher | None], tokens: list[int]) -> None:
    """Feed each row's sampled token to its matcher."""
    for matcher, token in zip(matchers, tokens):
        if matcher is not None and not matcher.is_stopped():
            matcher.consume_token(token)
