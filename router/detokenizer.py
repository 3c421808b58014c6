"""Token ids to text as they arrive: incremental detokenization and stop strings.

Decoding one token at a time is wrong for sentencepiece-style tokenizers (a token's leading space depends on
what precedes it) and for byte-fallback tokens (one character may span several tokens). `IncrementalDetokenizer`
uses the usual prefix-offset technique (TGI, vLLM): decode a short window that starts a few tokens back, and
emit only what the newest tokens added once it no longer ends in an incomplete character.
"""
from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

_REPLACEMENT_CHAR = "\ufffd"  # what decode() yields for an incomplete UTF-8 sequence
_PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first outputs, for their leading spaces


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0  # start of the window already turned into text, kept as context
        self._read_offset = len(self._ids)  # end of that window: tokens after it have no text out yet

    def push(self, token_id: int) -> str:
        """Add one token; returns the new text ("" while a character is still incomplete)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._drop_consumed()
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Text still held back at the end of the output (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _drop_consumed(self) -> None:
        # Tokens before the prefix window are never decoded again.
        if self._prefix_offset:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0


class StopStringMatcher:
    """Cuts the output at the first stop string, holding back text that may be the start of one.

    `feed` returns only text that can no longer become part of a stop string, so a stream never shows a
    stop string's first characters and then has to take them back. The stop string itself is emitted only with
    `include_stop` (vLLM's include_stop_str_in_output).
    """

    def __init__(self, stop: Sequence[str], include_stop: bool = False) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._stop = tuple(stop)
        self._include_stop = include_stop
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._pending = ""
        self.stopped = False

    def feed(self, text: str, check: bool = True) -> str:
        """Add new output text; returns the text that is safe to emit. Sets `stopped` on a match.
        `check=False` (before min_tokens are out) lets the text through without matching it."""
        if self.stopped:
            raise RuntimeError("feed() after a stop string matched")
        self._pending += text
        matches = [(i, len(s)) for i, s in ((self._pending.find(s), s) for s in self._stop) if i >= 0]
        if check and matches:
            cut, length = min(matches)
            self.stopped = True
            out, self._pending = self._pending[:cut + (length if self._include_stop else 0)], ""
            return out
        safe = max(len(self._pending) - self._hold, 0) if check else len(self._pending)
        out, self._pending = self._pending[:safe], self._pending[safe:]
        return out

    def flush(self) -> str:
        """At the end of the output: the held-back text, which turned out not to start a stop string."""
        out, self._pending = self._pending, ""
        return out
