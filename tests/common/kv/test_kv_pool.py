"""pool.py: block allocation, all-or-nothing growth, freeing, capacity from a memory budget."""
from __future__ import annotations

import pytest
import torch

from common.kv.config import KVConfig
from common.kv.format import KVLayout
from common.kv.interface import KVCacheFull
from common.kv.pool import KVPool


def _pool(num_blocks: int = 6, max_seqs: int = 3, mode: str = "hack") -> KVPool:
    layout = KVLayout(KVConfig(mode=mode, partition=32, block_size=64, num_sinks=4), num_kv_heads=2, head_dim=64)
    return KVPool(layout, num_layers=2, num_blocks=num_blocks, max_seqs=max_seqs)


def test_allocate_grows_sequences_page_by_page() -> None:
    pool = _pool()
    pool.allocate({1: 4})  # sinks only: a state slot, no page
    assert pool.used_blocks == 0 and pool.free_slots == 2
    pool.allocate({1: 5, 2: 4 + 65})
    assert pool.used_blocks == 3 and pool.num_tokens(2) == 69
    assert pool.block_tables([1, 2]).tolist() == [[0, 0], [1, 2]]
    assert pool.state_slots([1, 2]).tolist() == [0, 1]
    assert pool.can_fit(4 + 64 * 3) and not pool.can_fit(4 + 64 * 3 + 1)
    assert pool.can_fit(4 + 64 * 4, seq_id=2) and not pool.can_fit(4 + 64 * 5 + 1, seq_id=2)


def test_cache_full_changes_nothing() -> None:
    pool = _pool(num_blocks=4)
    pool.allocate({1: 100})
    before = (pool.used_blocks, pool.free_slots, pool.block_tables([1]).tolist(), pool.num_tokens(1))
    with pytest.raises(KVCacheFull):
        pool.allocate({1: 150, 2: 4 + 64 * 2})  # fits one by one, not together
    assert (pool.used_blocks, pool.free_slots, pool.block_tables([1]).tolist(), pool.num_tokens(1)) == before
    assert 2 not in pool


def test_state_slots_limit_the_number_of_sequences() -> None:
    pool = _pool(max_seqs=2)
    pool.allocate({1: 1, 2: 1})
    with pytest.raises(KVCacheFull, match="slots"):
        pool.allocate({3: 1})
    fp16 = _pool(max_seqs=1, mode="fp16")
    fp16.allocate({1: 1, 2: 1})  # fp16 sequences need no state slot
    assert fp16.state_slots([1, 2]).tolist() == [-1, -1]


def test_free_returns_every_page_and_slot() -> None:
    pool = _pool()
    pool.allocate({1: 70, 2: 200})
    pool.free(1)
    pool.free(1)  # unknown ids are a no-op
    pool.free(2)
    assert pool.used_blocks == 0 and pool.free_blocks == 6 and pool.free_slots == 3 and pool.num_seqs == 0
    pool.allocate({3: 4 + 64 * 6})
    assert sorted(pool.block_tables([3])[0].tolist()) == list(range(6))


def test_shrinking_is_rejected() -> None:
    pool = _pool()
    pool.allocate({1: 70})
    with pytest.raises(ValueError, match="shrink"):
        pool.allocate({1: 10})


def test_memory_accounting_matches_the_allocated_tensors() -> None:
    pool = _pool(num_blocks=5, max_seqs=3)
    layout = pool.layout
    page_bytes = sum(t.nbytes for name, t in pool.layers[0].items() if not name.startswith(("sink", "tail")))
    state_bytes = sum(t.nbytes for name, t in pool.layers[0].items() if name.startswith(("sink", "tail")))
    assert page_bytes == 5 * layout.block_bytes and state_bytes == 3 * layout.state_bytes
    total = sum(t.nbytes for layer in pool.layers for t in layer.values())
    assert KVPool.blocks_for_budget(layout, 2, total, 3) == 5
    assert KVPool.blocks_for_budget(layout, 2, total - 1, 3) == 4
    assert layout.memory_bytes(4 + 65, num_layers=2) == 2 * (2 * layout.block_bytes + layout.state_bytes)
    with pytest.raises(ValueError, match="does not hold one page"):
        KVPool.blocks_for_budget(layout, 2, 3 * 2 * layout.state_bytes, 3)


def test_unknown_sequence_in_block_tables_is_an_error() -> None:
    with pytest.raises(KeyError, match="unknown sequence 9"):
        _pool().block_tables([9])


def test_pool_tensors_start_zeroed_on_the_requested_device() -> None:
    pool = _pool()
    assert all(t.device == torch.device("cpu") and not t.any() for t in pool.layers[1].values())


@pytest.mark.parametrize("mode", ["hack", "fp16"])
def test_fork_copies_pages_and_state_into_new_sequences(mode: str) -> None:
    pool = _pool(num_blocks=8, mode=mode)
    pool.allocate({1: 4 + 70})  # two pages, the second partial
    for cache in pool.layers:
        for tensor in cache.values():
            tensor.copy_(torch.randint(0, 100, tensor.shape).to(tensor.dtype))
    pool.fork(1, [2, 3])
    assert [pool.num_tokens(s) for s in (1, 2, 3)] == [74, 74, 74] and pool.used_blocks == 6
    state = pool.layout.state_shapes()
    for cache in pool.layers:
        for name, tensor in cache.items():
            if name in state:
                slots = pool.state_slots([1, 2, 3]).tolist()
                assert all(torch.equal(tensor[slots[0]], tensor[slot]) for slot in slots[1:])
            else:
                pages = [pool.page_tensor(s) for s in (1, 2, 3)]
                assert all(torch.equal(tensor[pages[0]], tensor[p]) for p in pages[1:])
    pool.free(1)  # the copies own their pages: the source may go first
    assert pool.used_blocks == 4


def test_fork_is_all_or_nothing_and_refuses_live_targets() -> None:
    pool = _pool(num_blocks=5, max_seqs=3)
    pool.allocate({1: 4 + 100})  # two pages
    with pytest.raises(KVCacheFull):
        pool.fork(1, [2, 3])  # four more pages, three free
    assert pool.used_blocks == 2 and 2 not in pool and 3 not in pool
    with pytest.raises(ValueError, match="already exist"):
        pool.fork(1, [1])
