"""KV block accounting for the decode scheduler: what each request holds in the pool and in host swap space.

The scheduler decides on the event loop; the model thread allocates the pool's pages later, always within what
was counted here. So the counts below are the truth for admission and preemption, and the pool can never run
out mid-step: a request holds `blocks_for(tokens it will have stored after its next step)` pool blocks while
its KV is in the pool, and its exported size in swap blocks while it is swapped out to host memory.
"""
from __future__ import annotations

from dataclasses import dataclass

from common.kv.format import KVLayout


@dataclass
class BlockCount:
    """One request's share: pool blocks (KV in the pool) or swap blocks (KV swapped out to the host)."""

    pool: int = 0
    swap: int = 0


class BlockManager:
    def __init__(self, layout: KVLayout, total_blocks: int, swap_blocks: int) -> None:
        if total_blocks < 1 or swap_blocks < 0:
            raise ValueError(f"need total_blocks >= 1 and swap_blocks >= 0, got {total_blocks}, {swap_blocks}")
        self.layout, self.total_blocks, self.swap_blocks = layout, total_blocks, swap_blocks
        self.used_blocks = 0
        self.used_swap_blocks = 0

    @property
    def free_blocks(self) -> int:
        return self.total_blocks - self.used_blocks

    @property
    def free_swap_blocks(self) -> int:
        return self.swap_blocks - self.used_swap_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return self.layout.blocks_for(num_tokens)

    def growth(self, held: BlockCount, num_tokens: int) -> int:
        """Pool blocks a request holding `held` must add to store num_tokens tokens."""
        return max(0, self.blocks_for(num_tokens) - held.pool)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= self.free_blocks

    def allocate(self, held: BlockCount, num_tokens: int) -> None:
        """Grow `held` to num_tokens tokens in the pool (the caller checked can_allocate / can_append)."""
        need = self.growth(held, num_tokens)
        if need > self.free_blocks:
            raise RuntimeError(f"allocating {need} blocks with {self.free_blocks} free (a scheduler bug)")
        held.pool += need
        self.used_blocks += need

    def can_append(self, held: BlockCount, num_tokens: int) -> bool:
        return self.growth(held, num_tokens) <= self.free_blocks

    def can_swap_out(self, held: BlockCount) -> bool:
        return held.pool <= self.free_swap_blocks

    def swap_out(self, held: BlockCount) -> None:
        self.used_blocks -= held.pool
        self.used_swap_blocks += held.pool
        held.pool, held.swap = 0, held.pool

    def can_swap_in(self, held: BlockCount, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= self.free_blocks

    def swap_in(self, held: BlockCount, num_tokens: int) -> None:
        self.used_swap_blocks -= held.swap
        held.swap = 0
        self.allocate(held, num_tokens)

    def free(self, held: BlockCount) -> None:
        self.used_blocks -= held.pool
        self.used_swap_blocks -= held.swap
        held.pool = held.swap = 0
