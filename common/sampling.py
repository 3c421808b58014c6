"""Sampling parameters and the batched sampler, with vLLM's semantics.

Order of one step (as vLLM's v1 sampler): raw logprobs are taken from the model's logits (what `logprobs`
reports), then logit_bias and min_tokens (stop tokens masked), then the penalties (repetition over prompt and
output, frequency and presence over the output), then greedy argmax or temperature, top-k, top-p and a draw.
The whole batch is processed in tensor ops, and everything the host needs (tokens, logprobs) comes back in one
device-to-host transfer per step.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings, applied to the detokenized text
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # subtracted once from tokens present in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # divides positive / multiplies negative logits of prompt and output tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added logit)
    min_tokens: int = 0  # stop_token_ids cannot be sampled before this many output tokens
    logprobs: int | None = None  # None: no logprobs; k: the sampled token's and the top k
    json_schema: str | None = None  # structured output (common/structured.py masks the logits before sampling)
    position_offset: int = 0  # output tokens generated before (a resumed request): seeds use absolute positions

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.position_offset < 0:
            raise ValueError(f"position_offset must be >= 0, got {self.position_offset}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if not -2 <= self.presence_penalty <= 2 or not -2 <= self.frequency_penalty <= 2:
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2], got "
                             f"{self.presence_penalty} and {self.frequency_penalty}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


@dataclass(frozen=True)
class TokenLogprobs:
    """The log-probability of one token under the model, and the k most likely tokens at that position."""

    logprob: float
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


@dataclass(frozen=True)
class TokenHistory:
    """What a sequence has seen: the penalties' input."""

    prompt_ids: Sequence[int] = ()
    output_ids: Sequence[int] = ()


@dataclass(frozen=True)
class SampleOutput:
    tokens: list[int]
    logprobs: list[TokenLogprobs | None]  # per row; None where the request asked for none


class Sampler:
    """Samples one token per sequence. A seeded request draws output position i from a generator
    seeded by (seed, i), so its tokens depend neither on the rest of the batch nor on which
    process samples them (prefill samples position 0, decode the rest)."""

    def sample(self, logits: torch.Tensor, params: list[SamplingParams], positions: list[int],
               histories: list[TokenHistory] | None = None) -> list[int]:
        return self.run(logits, params, positions, histories).tokens

    def run(self, logits: torch.Tensor, params: list[SamplingParams], positions: list[int],
            histories: list[TokenHistory] | None = None) -> SampleOutput:
        """logits: [B, V]; positions: how many tokens each sequence has generated so far; histories: each
        sequence's prompt and output tokens (needed only by requests with penalties)."""
        if not len(params) == len(positions) == logits.shape[0]:
            raise ValueError(f"{logits.shape[0]} logit rows for {len(params)} params and {len(positions)} positions")
        positions = [p.position_offset + position for p, position in zip(params, positions)]  # absolute positions
        logits = logits.float()
        num_logprobs = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if num_logprobs is not None else None
        logits = apply_logit_bias_and_min_tokens(logits, params, positions)
        if any(p.penalized for p in params):
            if histories is None:
                raise ValueError("penalties need each sequence's token history")
            logits = apply_penalties(logits, params, histories)
        tokens = _draw(logits, params, positions)
        return _to_host(tokens, raw_logprobs, num_logprobs, params)


MAX_CHOICES = 16  # choices (OpenAI's `n`) per request


def choice_seed(seed: int, choice: int) -> int:
    """The seed of choice `choice` of an n > 1 request: seed + choice, as vLLM's parallel sampling does."""
    return (seed + choice) % (1 << 64)


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """The sampling parameters of each of n choices sharing one prompt: the same but for their seeds."""
    if not 1 <= n <= MAX_CHOICES:
        raise ValueError(f"n (choices) must be in [1, {MAX_CHOICES}], got {n}")
    if params.seed is None or n == 1:
        return [params] * n
    return [replace(params, seed=choice_seed(params.seed, i)) for i in range(n)]


def position_seed(seed: int, position: int) -> int:
    """A distinct 63-bit seed for each (request seed, output position)."""
    return (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


def apply_logit_bias_and_min_tokens(logits: torch.Tensor, params: list[SamplingParams],
                                    positions: list[int]) -> torch.Tensor:
    rows, cols, values = [], [], []
    for row, (p, position) in enumerate(zip(params, positions)):
        for token, bias in p.logit_bias:
            rows.append(row), cols.append(token), values.append(bias)
        if position < p.min_tokens:
            for token in p.stop_token_ids:
                rows.append(row), cols.append(token), values.append(float("-inf"))
    if not rows:
        return logits
    index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
    return logits.index_put(index, torch.tensor(values, device=logits.device), accumulate=True)


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams],
                    histories: list[TokenHistory]) -> torch.Tensor:
    """vLLM's penalties: repetition divides positive and multiplies negative logits of every token seen in the
    prompt or the output; frequency subtracts count * f and presence (count > 0) * p, counts over the output."""
    batch, vocab = logits.shape
    device = logits.device
    output_ids = _padded(histories, "output_ids", vocab, device)
    output_counts = torch.zeros(batch, vocab + 1, device=device)  # column `vocab` absorbs the padding
    output_counts.scatter_add_(1, output_ids, torch.ones_like(output_ids, dtype=output_counts.dtype))
    output_counts = output_counts[:, :vocab]
    prompt_seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=device)
    prompt_seen.scatter_(1, _padded(histories, "prompt_ids", vocab, device), True)
    seen = prompt_seen[:, :vocab] | (output_counts > 0)
    repetition = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None].expand(-1, vocab)
    repetition = torch.where(seen, repetition, torch.ones_like(repetition))
    logits = torch.where(logits > 0, logits / repetition, logits * repetition)
    frequency = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
    presence = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
    return logits - frequency * output_counts - presence * (output_counts > 0).float()


def _padded(histories: list[TokenHistory], field: str, pad: int, device: torch.device) -> torch.Tensor:
    lists = [list(getattr(h, field)) for h in histories]
    width = max((len(ids) for ids in lists), default=0) or 1
    return torch.tensor([ids + [pad] * (width - len(ids)) for ids in lists], dtype=torch.long, device=device)


def filtered_probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) over a 1-D logits row."""
    return filtered_probabilities_batch(logits[None], [params])[0]


def filtered_probabilities_batch(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[B, V] logits to [B, V] probabilities: temperature, top-k, then top-p over what top-k kept."""
    device = logits.device
    temperatures = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=device)
    logits = logits.float() / temperatures[:, None]
    top_k = [p.top_k if 0 < p.top_k < logits.shape[-1] else 0 for p in params]
    top_p = [p.top_p for p in params]
    if not any(top_k) and all(p >= 1.0 for p in top_p):
        return torch.softmax(logits, dim=-1)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=device)[None]
    k = torch.tensor([k or logits.shape[-1] for k in top_k], device=device)[:, None]
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= torch.tensor(top_p, device=device)[:, None]
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    probs = torch.zeros_like(sorted_probs).scatter_(-1, order, sorted_probs)
    return probs / probs.sum(-1, keepdim=True)


def _draw(logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> torch.Tensor:
    """One token per row: argmax for greedy rows, else an exponential race over the filtered probabilities
    (argmax of p / E with E ~ Exp(1) draws from p), the noise of a seeded row coming from its own generator."""
    greedy = logits.argmax(dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled_rows:
        return greedy
    probs = filtered_probabilities_batch(logits[sampled_rows], [params[i] for i in sampled_rows])
    noise = torch.empty_like(probs).exponential_()
    for j, i in enumerate(sampled_rows):
        if params[i].seed is not None:
            generator = torch.Generator(device=logits.device).manual_seed(position_seed(params[i].seed, positions[i]))
            noise[j].exponential_(generator=generator)
    drawn = (probs / noise).argmax(dim=-1)
    return greedy.index_put((torch.tensor(sampled_rows, device=logits.device),), drawn)


def _to_host(tokens: torch.Tensor, raw_logprobs: torch.Tensor | None, num_logprobs: int | None,
             params: list[SamplingParams]) -> SampleOutput:
    """Pack tokens and logprobs into one float64 tensor so a single device-to-host copy brings back the step."""
    batch = tokens.shape[0]
    parts = [tokens.double()[:, None]]
    if raw_logprobs is not None:
        top = raw_logprobs.topk(num_logprobs, dim=-1) if num_logprobs else None
        parts.append(raw_logprobs.gather(1, tokens[:, None]).double())
        if top is not None:
            parts += [top.indices.double(), top.values.double()]
    host = torch.cat(parts, dim=1).cpu().tolist()  # the step's one transfer
    token_ids = [int(row[0]) for row in host]
    logprobs: list[TokenLogprobs | None] = [None] * batch
    if raw_logprobs is not None:
        k = num_logprobs or 0
        for i, (row, p) in enumerate(zip(host, params)):
            if p.logprobs is not None:
                n = p.logprobs
                logprobs[i] = TokenLogprobs(row[1], tuple(int(t) for t in row[2:2 + n]),
                                            tuple(row[2 + k:2 + k + n]))
    return SampleOutput(token_ids, logprobs)
