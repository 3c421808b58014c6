"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, per-request seeds."""
from __future__ import annotations

from dataclasses import dataclass

import torch


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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Samples one token per sequence. A seeded request draws output position i from a generator
    seeded by (seed, i), so its tokens depend neither on the rest of the batch nor on which
    process samples them (prefill samples position 0, decode the rest)."""

    def sample(self, logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> list[int]:
        """logits: [B, V] float32; positions: how many tokens each sequence has generated so far."""
        tokens = []
        for row, p, position in zip(logits, params, positions, strict=True):
            tokens.append(int(row.argmax()) if p.greedy else self._sample_row(row, p, p.position_offset + position))
        return tokens

    @staticmethod
    def _sample_row(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
        probs = filtered_probabilities(logits, params)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=logits.device).manual_seed(position_seed(params.seed, position))
        return int(torch.multinomial(probs, 1, generator=generator))


def position_seed(seed: int, position: int) -> int:
    """A distinct 63-bit seed for each (request seed, output position)."""
    return (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


def filtered_probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) over a 1-D logits row."""
    logits = logits.float() / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs / probs.sum()
