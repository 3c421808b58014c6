"""Fixtures for the KV tests: a one-layer pool filled with random K/V through the reference store path."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from common.kv import reference
from common.kv.config import KVConfig
from common.kv.format import KVLayout
from common.kv.pool import KVPool


@dataclass
class FilledCache:
    config: KVConfig
    pool: KVPool
    k: torch.Tensor  # [n, Hkv, D] the float K that was stored
    v: torch.Tensor
    block_tables: torch.Tensor
    state_slots: torch.Tensor

    @property
    def cache(self) -> dict[str, torch.Tensor]:
        return self.pool.layers[0]


def fill_cache(config: KVConfig, num_kv_heads: int, head_dim: int, num_tokens: int, seed: int = 0,
               chunk: int | None = None) -> FilledCache:
    """Store num_tokens random tokens of one sequence, in one call or `chunk` tokens at a time."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    layout = KVLayout(config, num_kv_heads, head_dim)
    pool = KVPool(layout, num_layers=1, num_blocks=layout.blocks_for(num_tokens) + 2, max_seqs=2)
    step = chunk or num_tokens
    for start in range(0, num_tokens, step):
        n = min(step, num_tokens - start)
        pool.allocate({0: start + n})
        bt, slots = pool.block_tables([0]), pool.state_slots([0])
        rows = slice(start, start + n)
        if config.compressed:
            reference.store_compressed_kv(k[rows], v[rows], torch.tensor([0, n]), torch.tensor([start]), bt, slots,
                                          pool.layers[0], config, torch.Generator().manual_seed(seed))
        else:
            reference.store_fp16_kv(k[rows], v[rows], torch.tensor([0, n]), torch.tensor([start]), bt,
                                    pool.layers[0], config.block_size)
    return FilledCache(config, pool, k, v, pool.block_tables([0]), pool.state_slots([0]))


@pytest.fixture
def filled():
    return fill_cache
