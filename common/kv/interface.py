"""The contract between the model forward and whatever stores K and V.

The model computes q, k, v for a packed batch of new tokens and calls
`KVBackend.attend(layer, q, k, v, batch)` once per layer. The backend appends k and v
to its own storage (float, 2-bit HACK codes, ...) and returns the attention output of
every new token over that sequence's cached tokens plus the new tokens up to itself
(causal). The model never sees how K and V are stored.

Packing: the new tokens of all sequences are concatenated along the first dimension,
sequence i owning rows cu_new[i]:cu_new[i+1]. Prefill has num_cached == 0 and
num_new == prompt length; decode has num_new == 1; chunked prefill has both > 0.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


class KVCacheFull(RuntimeError):
    """Raised by `KVBackend.reserve` when the new tokens do not fit; nothing was stored."""


@dataclass(frozen=True)
class ForwardBatch:
    seq_ids: tuple[int, ...]
    num_cached: tuple[int, ...]  # tokens of each sequence already stored in the backend
    num_new: tuple[int, ...]  # tokens of each sequence in this forward
    positions: torch.Tensor = field(repr=False)  # [T] int64, absolute position of each new token
    cu_new: torch.Tensor = field(repr=False)  # [B + 1] int64, offsets of each sequence's rows

    @staticmethod
    def build(
        seq_ids: list[int], num_cached: list[int], num_new: list[int], device: torch.device | str = "cpu"
    ) -> "ForwardBatch":
        if not (len(seq_ids) == len(num_cached) == len(num_new)) or not seq_ids:
            raise ValueError("seq_ids, num_cached and num_new must be non-empty and of equal length")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"duplicate sequence ids in one batch: {seq_ids}")
        if min(num_new) < 1 or min(num_cached) < 0:
            raise ValueError("each sequence needs at least one new token and a non-negative cached count")
        cached = torch.tensor(num_cached, dtype=torch.int64)
        if len(num_new) == sum(num_new):  # decode: one token per sequence, at its cached count
            positions, cu_new = cached, torch.arange(len(seq_ids) + 1, dtype=torch.int64)
        else:
            counts = torch.tensor(num_new, dtype=torch.int64)
            cu_new = torch.zeros(len(seq_ids) + 1, dtype=torch.int64)
            cu_new[1:] = torch.cumsum(counts, 0)
            positions = torch.repeat_interleave(cached - cu_new[:-1], counts) + torch.arange(int(cu_new[-1]))
        return ForwardBatch(
            tuple(seq_ids), tuple(num_cached), tuple(num_new), positions.to(device), cu_new.to(device)
        )

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.num_new)

    def rows(self, i: int) -> slice:
        """Rows of sequence i in the packed token dimension."""
        start = sum(self.num_new[:i])
        return slice(start, start + self.num_new[i])


class KVBackend(ABC):
    """Stores K/V for many sequences and computes attention over them.

    Life cycle of a sequence: `reserve(batch)` before each forward that adds tokens
    (raises KVCacheFull and stores nothing if they do not fit), `attend` for every layer,
    `free(seq_id)` when the sequence finishes, is cancelled or fails.
    """

    @abstractmethod
    def reserve(self, batch: ForwardBatch) -> None:
        """Make room for batch.num_new tokens of each sequence (new sequences are created)."""

    @abstractmethod
    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] (after RoPE). Returns [T, Hq, D] in q's dtype."""

    @abstractmethod
    def free(self, seq_id: int) -> None:
        """Release everything stored for seq_id (a no-op for an unknown id)."""

    @abstractmethod
    def num_tokens(self, seq_id: int) -> int:
        """Tokens stored for seq_id (0 for an unknown id)."""
