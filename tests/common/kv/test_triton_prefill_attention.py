"""Triton homomorphic prefill attention against reference.hack_attention (tolerance: triton_support.HOMOMORPHIC).

Cases cover full and chunked prefill of mixed lengths (1, 17, 130 tokens: partial blocks and open tails) on
shuffled pages, GQA 1/4/8, head_dim 64/128, both key axes, 2/4/8 bits, sinks, and the two ablations.
"""
from __future__ import annotations

import pytest
import torch

from common.kv import reference
from common.kv.config import PAPER_SETTING, KVConfig
from tests.common.kv.triton_support import (
    DEVICE, HOMOMORPHIC, assert_attention_close, cumulative, fresh_seed, import_kernels, interpret, nan_like,
    random_batch,
)

prefill = import_kernels("triton_prefill_attention")
pytestmark = pytest.mark.usefixtures(interpret.__name__)

CASES = [
    # config, KV heads, query heads per KV head, head_dim, tokens stored, of which new queries (None: all)
    pytest.param(KVConfig(**PAPER_SETTING, partition=32, block_size=64, key_axis="token", num_sinks=0), 2, 4, 64, [1, 17, 130], None,
                 id="gqa4-full-prefill"),
    pytest.param(KVConfig(**PAPER_SETTING, partition=32, bits=4, key_axis="channel", num_sinks=4), 2, 1, 128, [5, 17, 130],
                 [5, 1, 40], id="gqa1-channel-4bit-sinks-chunked"),
    pytest.param(KVConfig(**PAPER_SETTING, partition=64, bits=8, key_axis="token", num_sinks=1, requant_elimination=False,
                          sum_elimination=False), 1, 8, 64,
                 [1, 17, 130], [1, 17, 3], id="gqa8-8bit-ablations-chunked"),
    pytest.param(KVConfig(partition=32, num_sinks=2, window=40, rotate=False), 1, 3, 32, [1, 17, 130], [1, 17, 50],
                 id="gqa3-window-chunked"),  # the default format's 16-bit window: a tail of Π + 40 rows
    pytest.param(KVConfig(partition=32, num_sinks=2, window=40, rotate=False, key_bits=4), 1, 3, 32, [1, 17, 130],
                 [1, 17, 50], id="gqa3-k4-v2-window-chunked"),
    pytest.param(KVConfig(partition=32, num_sinks=2, window=40, token_scales=True), 1, 3, 32, [1, 17, 130],
                 [1, 17, 50], id="gqa3-token-scales-window-chunked"),
]


@pytest.mark.parametrize("config, num_kv_heads, group, head_dim, seq_lens, num_queries", CASES)
def test_prefill_matches_reference(config, num_kv_heads, group, head_dim, seq_lens, num_queries):
    seed = fresh_seed()
    batch, gen = random_batch(config, num_kv_heads, head_dim, seq_lens, seed)
    cu_q = cumulative(num_queries or seq_lens).to(DEVICE)
    num_heads = num_kv_heads * group
    fused = torch.randn(int(cu_q[-1]), num_heads + 2 * num_kv_heads, head_dim, generator=gen).to(DEVICE)
    q = fused[:, :num_heads]  # a strided view, as sliced from a fused qkv projection
    args = (q, cu_q, batch.seq_lens, batch.block_tables, batch.state_slots, batch.cache, config, head_dim**-0.5)
    out = prefill.hack_prefill_attention(*args, out=nan_like(q))
    assert_attention_close(out, reference.hack_attention(*args), HOMOMORPHIC, seed)


def test_prefill_rejects_mismatched_offsets():
    config = KVConfig(**PAPER_SETTING, partition=32)
    batch, _ = random_batch(config, 1, 64, [3, 4], fresh_seed())
    q = torch.randn(7, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="cu_q"):
        prefill.hack_prefill_attention(q, cumulative([7]).to(DEVICE), batch.seq_lens, batch.block_tables,
                                       batch.state_slots, batch.cache, config, 0.125)
