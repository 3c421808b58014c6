"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, per-request seeds."""
from __future__ import annotations

from dataclasses import dataclass, field

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

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Sampler:
    """Samples one token per sequence; each seeded request owns its own generator so its
    output does not depend on what else is in the batch."""

    generators: dict[int, torch.Generator] = field(default_factory=dict)

    def sample(self, logits: torch.Tensor, seq_ids: list[int], params: list[SamplingParams]) -> list[int]:
        """logits: [B, V] float32. Returns one token id per row."""
        tokens = []
        for row, seq_id, p in zip(logits, seq_ids, params):
            tokens.append(int(row.argmax()) if p.greedy else self._sample_row(row, seq_id, p))
        return tokens

    def _sample_row(self, logits: torch.Tensor, seq_id: int, params: SamplingParams) -> int:
        probs = filtered_probabilities(logits, params)
        generator = self._generator(seq_id, params.seed, logits.device)
        return int(torch.multinomial(probs, 1, generator=generator))

    def _generator(self, seq_id: int, seed: int | None, device: torch.device) -> torch.Generator | None:
        if seed is None:
            return None
        if seq_id not in self.generators:
            self.generators[seq_id] = torch.Generator(device=device).manual_seed(seed)
        return self.generators[seq_id]

    def release(self, seq_id: int) -> None:
        self.generators.pop(seq_id, None)


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
