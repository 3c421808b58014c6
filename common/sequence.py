"""One request's token state and its token-level stop conditions.

Shared by the in-process engine and the decode service so both stop at the same token.
Stop *strings* need detokenized text and are applied by whoever holds the tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from common.sampling import SamplingParams


def validate_prompt(prompt_ids: list[int], max_tokens: int, context_window: int, vocab_size: int) -> None:
    """Raise ValueError naming the problem if the prompt cannot be served."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids out of range [0, {vocab_size}): {bad[:5]}")
    if len(prompt_ids) + max_tokens > context_window:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds the context window "
            f"of {context_window} tokens"
        )


@dataclass
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length" once finished

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    def append(self, token: int) -> str | None:
        """Record a sampled token; returns the finish reason if it ends the sequence."""
        self.output_ids.append(token)
        self.finish_reason = finish_reason(self.output_ids, self.params, self.eos_token_ids)
        return self.finish_reason


def finish_reason(output_ids: list[int], params: SamplingParams, eos_token_ids: tuple[int, ...] = ()) -> str | None:
    """"stop" if the last output token is a stop token, "length" once max_tokens are out, else None.

    Also used by the decode service, which holds the output tokens but not the prompt."""
    stops = params.stop_token_ids + (() if params.ignore_eos else eos_token_ids)
    if output_ids and output_ids[-1] in stops:
        return "stop"
    if len(output_ids) >= params.max_tokens:
        return "length"
    return None
