"""torch_fast.py against reference.py: the batched torch ops compute what the reference computes.

Mixed lengths (1, 17, 130 tokens) on shuffled, poisoned pages whose unused block-table entries hold garbage;
decode and multi-token forwards; GQA 1/4/8, head_dim 8/64/128, both key axes, 2/4/8 bits, sinks 0/4, both
ablations off; a batch split into chunks; the routing through ops.dispatch and HACK_KV_OPS; and the paged
backends of all three modes running on the fast ops end to end.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from common.kv import ops, reference, torch_fast
from common.kv.config import KVConfig
from common.kv.factory import make_kv_backend
from common.kv.format import KVLayout
from common.kv.interface import ForwardBatch
from common.kv.pool import KVPool
from tests.common.kv.triton_support import (
    HOMOMORPHIC, Tolerance, assert_attention_close, cumulative, fresh_seed, poison, random_batch,
)

FP32 = Tolerance(max=1e-5, p99=1e-6, mean=1e-7)  # float32 rounding of sums taken in another order
GARBAGE_PAGE = 10**6  # what an unused block-table entry may hold: the ops must never read it

CASES = [
    # config, KV heads, query heads per KV head, head_dim, sequence lengths
    pytest.param(KVConfig(partition=32, block_size=64, key_axis="token", num_sinks=0, sum_elimination=False), 2, 4,
                 128, [1, 17, 130], id="gqa4-token-d128-no-sums"),
    pytest.param(KVConfig(partition=64, bits=4, key_axis="channel", num_sinks=4), 1, 8, 64, [130, 2, 33],
                 id="gqa8-channel-4bit-sinks"),
    pytest.param(KVConfig(partition=32, bits=8, key_axis="channel", num_sinks=4, requant_elimination=False), 4, 1,
                 8, [17, 1, 130], id="gqa1-d8-8bit-requant"),
]
OPS = [pytest.param("hack_attention", HOMOMORPHIC, id="hack"), pytest.param("dequant_attention", FP32, id="dequant")]


def garbage_padding(block_tables: torch.Tensor, blocks_used: list[int]) -> torch.Tensor:
    """The tables with every entry past a sequence's pages replaced by a page id that does not exist."""
    columns = torch.arange(block_tables.shape[1])[None, :]
    return torch.where(columns < torch.tensor(blocks_used)[:, None], block_tables, GARBAGE_PAGE).int()


def new_token_counts(seq_lens: list[int]) -> list[int]:
    """A mixed forward: decodes, a chunk and a longer chunk (1 <= count <= length)."""
    return [max(1, n // 3) for n in seq_lens]


def compressed_args(config: KVConfig, num_kv_heads: int, group: int, head_dim: int, seq_lens: list[int],
                    counts: list[int]) -> tuple:
    """Reference-signature arguments of a compressed attention op: sum(counts) fresh queries over a batch."""
    batch, gen = random_batch(config, num_kv_heads, head_dim, seq_lens, fresh_seed(), k_scale=2.0)
    layout = KVLayout(config, num_kv_heads, head_dim)
    tables = garbage_padding(batch.block_tables, [layout.blocks_for(n) for n in seq_lens])
    q = torch.randn(sum(counts), num_kv_heads * group, head_dim, generator=gen)
    return (q, cumulative(counts), batch.seq_lens, tables, batch.state_slots, batch.cache, config, head_dim**-0.5)


@pytest.mark.parametrize("op, tolerance", OPS)
@pytest.mark.parametrize("config, num_kv_heads, group, head_dim, seq_lens", CASES)
@pytest.mark.parametrize("forward", ["decode", "mixed"])
def test_compressed_attention_matches_reference(op, tolerance, config, num_kv_heads, group, head_dim, seq_lens,
                                                forward):
    counts = [1] * len(seq_lens) if forward == "decode" else new_token_counts(seq_lens)
    args = compressed_args(config, num_kv_heads, group, head_dim, seq_lens, counts)
    out = getattr(torch_fast, op)(*args)
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    assert_attention_close(out, getattr(reference, op)(*args), tolerance)


@pytest.mark.parametrize("op, tolerance", OPS)
def test_chunked_batch_matches_reference(monkeypatch, op, tolerance):
    """A chunk per sequence (tiny budget) slices queries, offsets, tables and slots consistently."""
    monkeypatch.setattr(torch_fast, "CHUNK_ELEMENTS", 1)
    seq_lens = [130, 1, 17, 64]
    args = compressed_args(KVConfig(partition=32, num_sinks=4), 2, 4, 64, seq_lens, new_token_counts(seq_lens))
    chunks = list(torch_fast.sequence_chunks(args[1], args[3], 1))
    assert [c.seqs for c in chunks] == [slice(i, i + 1) for i in range(4)]
    assert_attention_close(getattr(torch_fast, op)(*args), getattr(reference, op)(*args), tolerance)


@pytest.mark.parametrize("op, tolerance", OPS)
def test_batch_without_filled_pages_reads_sinks_and_tails_only(op, tolerance):
    seq_lens = [1, 4, 19]  # 4 sinks, then at most 15 tokens of the open 32-token partition
    args = compressed_args(KVConfig(partition=32, num_sinks=4), 2, 4, 64, seq_lens, new_token_counts(seq_lens))
    assert_attention_close(getattr(torch_fast, op)(*args), getattr(reference, op)(*args), tolerance)


def test_homomorphic_path_never_dequantizes(monkeypatch):
    def forbidden(*_):
        raise AssertionError("hack attention dequantized the cache")

    monkeypatch.setattr(reference, "dequantize_paged", forbidden)
    args = compressed_args(KVConfig(partition=32), 2, 2, 64, [40, 3], [1, 1])
    assert torch_fast.hack_attention(*args).isfinite().all()


@pytest.mark.parametrize("config, head_dim, seq_lens", [
    pytest.param(KVConfig(partition=32, num_sinks=4), 8, [130, 17, 200], id="d8-sums"),
    pytest.param(KVConfig(partition=64, bits=4, sum_elimination=False), 64, [300, 65], id="d64-no-sums"),
    pytest.param(KVConfig(partition=32, key_axis="token"), 64, [45], id="token-axis"),
])
def test_hack_scores_are_the_reference_values(config, head_dim, seq_lens):
    """The lean channel-axis product drops only exact zeros: equal to the reference's float32-product scores."""
    batch, gen = random_batch(config, 2, head_dim, seq_lens, fresh_seed())
    kv = torch_fast.read_compressed(batch.cache, batch.seq_lens, batch.block_tables, batch.state_slots, config)
    qh = torch.randn(kv.sink_k.shape[0], 9, head_dim, generator=gen)
    expected = reference.hack_scores(qh, kv.paged, config, product_dtype=torch.float32)
    assert torch.equal(torch_fast.hack_scores(qh, kv.paged, config), expected)


# ---------------------------------------------------------------------------------------------------------------
# fp16 mode
# ---------------------------------------------------------------------------------------------------------------


def fp16_pools(num_kv_heads: int, head_dim: int, block_size: int, seq_lens: list[int],
               gen: torch.Generator) -> tuple[dict, dict, torch.Tensor]:
    """Two identical poisoned fp16 pools (reference, fast) and shuffled tables with garbage padding."""
    layout = KVLayout(KVConfig(mode="fp16", partition=32, block_size=block_size), num_kv_heads, head_dim)
    blocks = [layout.blocks_for(n) for n in seq_lens]
    num_blocks = len(seq_lens) * max(blocks) + 2
    cache = KVPool(layout, 1, num_blocks, 1).layers[0]
    poison(cache, gen)
    tables = torch.randperm(num_blocks, generator=gen)[: len(seq_lens) * max(blocks)].view(len(seq_lens), -1)
    return cache, {name: t.clone() for name, t in cache.items()}, garbage_padding(tables, blocks)


def assert_same_bytes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for name in a:
        assert torch.equal(a[name].view(torch.int16), b[name].view(torch.int16)), name


def test_fp16_store_writes_the_reference_bytes():
    """A prefill of mixed lengths, then a decode step and a chunk that cross page boundaries."""
    gen = torch.Generator().manual_seed(fresh_seed())
    steps = [([0, 0, 0], [1, 17, 30]), ([1, 17, 30], [1, 1, 15])]  # (cached, new) per sequence
    ref_cache, fast_cache, tables = fp16_pools(2, 64, 32, [2, 18, 45], gen)
    for cached, new in steps:
        k, v = (torch.randn(sum(new), 2, 64, generator=gen) for _ in "kv")
        args = (k, v, cumulative(new), torch.tensor(cached), tables)
        reference.store_fp16_kv(*args, ref_cache, 32)
        torch_fast.store_fp16_kv(*args, fast_cache, 32)
        assert_same_bytes(fast_cache, ref_cache)


@pytest.mark.parametrize("num_kv_heads, group, head_dim", [(4, 1, 8), (1, 8, 128), (2, 4, 64)])
def test_fp16_attention_matches_reference(num_kv_heads, group, head_dim):
    gen = torch.Generator().manual_seed(fresh_seed())
    seq_lens = [1, 17, 130]
    cache, _, tables = fp16_pools(num_kv_heads, head_dim, 32, seq_lens, gen)
    k, v = (torch.randn(sum(seq_lens), num_kv_heads, head_dim, generator=gen) for _ in "kv")
    reference.store_fp16_kv(k, v, cumulative(seq_lens), torch.zeros(3, dtype=torch.int64), tables, cache, 32)
    for counts in ([1, 1, 1], new_token_counts(seq_lens)):
        q = torch.randn(sum(counts), num_kv_heads * group, head_dim, generator=gen)
        args = (q, cumulative(counts), torch.tensor(seq_lens), tables, cache, 32, head_dim**-0.5)
        assert_attention_close(torch_fast.fp16_attention(*args), reference.fp16_attention(*args), FP32)


@pytest.mark.parametrize("num_kv_heads, group, head_dim", [(1, 3, 16), (2, 1, 8), (3, 3, 64)])
def test_blockwise_fp16_attention_matches_reference_on_odd_shapes(num_kv_heads, group, head_dim):
    seed = fresh_seed()
    print(f"seed {seed}")  # shown on failure, to replay it
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [1, 17, 130, 75]
    cache, _, tables = fp16_pools(num_kv_heads, head_dim, 32, seq_lens, gen)
    k, v = (torch.randn(sum(seq_lens), num_kv_heads, head_dim, generator=gen) for _ in "kv")
    reference.store_fp16_kv(k, v, cumulative(seq_lens), torch.zeros(4, dtype=torch.int64), tables, cache, 32)
    for counts in ([1, 1, 1, 1], [1, 17, 130, 75], [1, 5, 33, 64]):  # decode, prefill, chunked prefill
        q = torch.randn(sum(counts), num_kv_heads * group, head_dim, generator=gen)
        args = (q, cumulative(counts), torch.tensor(seq_lens), tables, cache, 32, head_dim**-0.5)
        got = torch_fast.fp16_attention_blockwise(*args, query_block=7, key_block=40)  # blocks across pages
        assert_attention_close(got, reference.fp16_attention(*args), FP32)


def test_long_fp16_chunks_take_the_blockwise_path(monkeypatch):
    calls = []
    monkeypatch.setattr(torch_fast, "SCORE_ELEMENTS", 1000)
    blockwise = torch_fast.fp16_attention_blockwise
    monkeypatch.setattr(torch_fast, "fp16_attention_blockwise", lambda *a: calls.append(1) or blockwise(*a))
    gen = torch.Generator().manual_seed(fresh_seed())
    cache, _, tables = fp16_pools(2, 16, 32, [40], gen)
    k, v = (torch.randn(40, 2, 16, generator=gen) for _ in "kv")
    reference.store_fp16_kv(k, v, cumulative([40]), torch.zeros(1, dtype=torch.int64), tables, cache, 32)
    q = torch.randn(40, 4, 16, generator=gen)
    args = (q, cumulative([40]), torch.tensor([40]), tables, cache, 32, 0.25)
    assert_attention_close(torch_fast.fp16_attention(*args), reference.fp16_attention(*args), FP32)
    assert calls == [1]


# ---------------------------------------------------------------------------------------------------------------
# Compressed store
# ---------------------------------------------------------------------------------------------------------------

# (cached, new) per sequence: sinks, then decodes through the open tail, a flush at 4 + 32 tokens, a chunk beside
# decodes, and decodes right after the flush.
STORE_STEPS = [([0, 0, 0], [1, 3, 17]), ([1, 3, 17], [1, 1, 1]), ([2, 4, 18], [1, 1, 17]),
               ([3, 5, 35], [1, 1, 1]), ([4, 6, 36], [30, 1, 1])]


@pytest.mark.parametrize("config", [
    pytest.param(KVConfig(partition=32, num_sinks=4), id="channel-sinks"),
    pytest.param(KVConfig(partition=32, key_axis="token", num_sinks=0, rounding="stochastic"), id="stochastic"),
    pytest.param(KVConfig(partition=32, num_sinks=4, requant_elimination=False), id="requant"),
])
def test_compressed_store_writes_the_reference_bytes(config):
    gen = torch.Generator().manual_seed(fresh_seed())
    layout = KVLayout(config, 2, 8)
    pool = KVPool(layout, 1, 12, 4)
    pool.allocate({seq: 64 for seq in range(3)})
    poison(pool.layers[0], gen)
    ref_cache = {name: t.clone() for name, t in pool.layers[0].items()}
    tables, slots = pool.block_tables([2, 0, 1]), pool.state_slots([2, 0, 1])  # slots out of batch order
    generators = [torch.Generator().manual_seed(config.seed) for _ in "rf"]
    for cached, new in STORE_STEPS:
        k, v = (torch.randn(sum(new), 2, 8, generator=gen) for _ in "kv")
        args = (k, v, cumulative(new), torch.tensor(cached), tables, slots)
        reference.store_compressed_kv(*args, ref_cache, config, generators[0])
        torch_fast.store_compressed_kv(*args, pool.layers[0], config, generators[1])
        for name, expected in ref_cache.items():
            assert torch.equal(pool.layers[0][name].view(torch.uint8), expected.view(torch.uint8)), (name, cached)


def test_select_sequences_picks_rows_and_offsets():
    rows, cu = torch_fast.select_sequences(cumulative([2, 1, 3, 1]), torch.tensor([2, 0, 3]))
    assert rows.tolist() == [3, 4, 5, 0, 1, 6] and cu.tolist() == [0, 3, 5, 6]


# ---------------------------------------------------------------------------------------------------------------
# Routing, and the backends on the fast ops
# ---------------------------------------------------------------------------------------------------------------


def test_dispatch_routes_to_the_fast_ops_unless_the_reference_is_forced(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("HACK_KV_OPS", raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for name in ("store_fp16_kv", "store_compressed_kv", "fp16_attention"):
        assert ops.dispatch(name, cpu) is getattr(torch_fast, name)  # compressed attention: test_cpu_ops.py
    assert ops.dispatch("fp16_attention", cuda) is torch_fast.fp16_attention
    assert ops.dispatch("causal_attention", cpu) is reference.causal_attention
    monkeypatch.setenv("HACK_KV_OPS", "reference")
    assert ops.dispatch("hack_attention", cpu) is reference.hack_attention
    assert ops.dispatch("fp16_attention", cuda) is reference.fp16_attention
    monkeypatch.setenv("HACK_KV_OPS", "fast")
    with pytest.raises(ValueError, match="HACK_KV_OPS must be one of"):
        ops.dispatch("hack_attention", cpu)


STEPS = [([0, 1], [0, 0], [17, 130]), ([0, 1], [17, 130], [1, 1]), ([1, 0], [131, 18], [1, 40])]


@pytest.mark.parametrize("config, tolerance", [
    pytest.param(KVConfig(mode="fp16", partition=32), FP32, id="fp16"),
    pytest.param(KVConfig(mode="dequant", partition=32, bits=4, num_sinks=2), FP32, id="dequant"),
    pytest.param(KVConfig(mode="hack", partition=32, block_size=64), HOMOMORPHIC, id="hack"),
])
def test_backend_on_fast_ops_matches_backend_on_reference(monkeypatch, config, tolerance):
    """A mixed prefill, a decode step, then a decode beside a chunk: same outputs, same stored bytes."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    shape = SimpleNamespace(num_layers=1, num_heads=8, num_kv_heads=2, head_dim=64)
    backends = {impl: make_kv_backend(config, shape, "cpu", torch.float32, max_tokens=512)
                for impl in ("auto", "reference")}
    gen = torch.Generator().manual_seed(fresh_seed())
    for seq_ids, num_cached, num_new in STEPS:
        batch = ForwardBatch.build(seq_ids, num_cached, num_new, "cpu")
        q, k, v = (torch.randn(batch.num_tokens, h, 64, generator=gen) for h in (8, 2, 2))
        outputs = {}
        for impl, backend in backends.items():
            monkeypatch.setenv("HACK_KV_OPS", impl)
            backend.reserve(batch)
            outputs[impl] = backend.attend(0, q, k, v, batch)
        assert_attention_close(outputs["auto"], outputs["reference"], tolerance)
    for name, expected in backends["reference"].pool.layers[0].items():
        assert torch.equal(backends["auto"].pool.layers[0][name].view(torch.uint8), expected.view(torch.uint8)), name
