"""Triton homomorphic paged decode attention against reference.hack_decode_attention.

One new token per sequence over mixed lengths (1, 17, 130 tokens) on shuffled pages, with one and several
splits per sequence (flash-decoding combine), GQA 1/4/8, head_dim 64/128, both key axes, 2/4/8 bits, sinks and
the two ablations.
"""
from __future__ import annotations

import pytest
import torch

from common.kv import reference
from common.kv.config import PAPER_SETTING, KVConfig
from tests.common.kv.triton_support import (
    DEVICE, HOMOMORPHIC, assert_attention_close, fresh_seed, import_kernels, interpret, nan_like, random_batch,
)

decode = import_kernels("triton_decode_attention")
pytestmark = pytest.mark.usefixtures(interpret.__name__)

CASES = [
    # config, KV heads, query heads per KV head, head_dim, sequence lengths, splits per sequence
    pytest.param(KVConfig(**PAPER_SETTING, partition=32, block_size=64, key_axis="token", num_sinks=0), 2, 4, 128, [1, 17, 130], 3,
                 id="gqa4-token-3splits"),
    pytest.param(KVConfig(**PAPER_SETTING, partition=32, bits=4, key_axis="channel", num_sinks=4), 1, 8, 64, [2, 33, 130], None,
                 id="gqa8-channel-4bit-sinks"),
    pytest.param(KVConfig(**PAPER_SETTING, partition=128, bits=8, key_axis="channel", num_sinks=0, requant_elimination=False,
                          sum_elimination=False), 4, 1, 128,
                 [1, 17, 130], 2, id="gqa1-8bit-ablations-2splits"),
    pytest.param(KVConfig(partition=32, num_sinks=2, window=40, rotate=False), 1, 3, 32, [1, 17, 130], 2,
                 id="gqa3-window-2splits"),  # the default format's 16-bit window: a tail of Π + 40 rows
    pytest.param(KVConfig(partition=32, num_sinks=1, window=40, rotate=False, requant_elimination=False), 1, 3, 32,
                 [1, 17, 130], 1, id="gqa3-window-requant"),
    pytest.param(KVConfig(partition=32, num_sinks=2, window=40, rotate=False, key_bits=4), 1, 3, 32, [1, 17, 130], 2,
                 id="gqa3-k4-v2-window"),  # K codes of their own width
    pytest.param(KVConfig(**PAPER_SETTING, partition=32, key_axis="token", key_bits=8, num_sinks=0), 1, 3, 32,
                 [17, 1, 70], None, id="gqa3-token-k8-v2"),
    pytest.param(KVConfig(partition=32, num_sinks=2, window=40, token_scales=True), 1, 3, 32, [1, 17, 130], 2,
                 id="gqa3-token-scales-window"),
    pytest.param(KVConfig(**(PAPER_SETTING | {"token_scales": True}), partition=32, key_axis="token", num_sinks=0), 1, 3, 32,
                 [17, 1, 70], None, id="gqa3-token-axis-token-scales"),
]


@pytest.mark.parametrize("config, num_kv_heads, group, head_dim, seq_lens, num_splits", CASES)
def test_decode_matches_reference(config, num_kv_heads, group, head_dim, seq_lens, num_splits):
    seed = fresh_seed()
    batch, gen = random_batch(config, num_kv_heads, head_dim, seq_lens, seed, k_scale=2.0)
    q = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, generator=gen).to(DEVICE)
    args = (q, batch.seq_lens, batch.block_tables, batch.state_slots, batch.cache, config, head_dim**-0.5)
    out = decode.hack_decode_attention(*args, out=nan_like(q), num_splits=num_splits)
    assert_attention_close(out, reference.hack_decode_attention(*args), HOMOMORPHIC, seed)


@pytest.mark.parametrize("batch, max_tiles, expected", [
    (1, 2048, 33),  # one long sequence: 8 heads x 33 splits fill 132 SMs twice
    (1, 10, 3),  # short: no split below 4 token groups
    (32, 2048, 2),
    (64, 2048, 1),  # the batch alone fills the GPU
])
def test_default_splits_fill_the_sms_without_tiny_splits(batch, max_tiles, expected):
    assert decode.default_num_splits(batch, num_kv_heads=8, max_tiles=max_tiles, num_sms=132) == expected


def test_decode_rejects_more_than_one_query_per_sequence():
    config = KVConfig(**PAPER_SETTING, partition=32)
    batch, _ = random_batch(config, 1, 64, [3, 4], fresh_seed())
    with pytest.raises(ValueError, match="one query per sequence"):
        decode.hack_decode_attention(torch.randn(3, 1, 64, device=DEVICE), batch.seq_lens, batch.block_tables,
                                     batch.state_slots, batch.cache, config, 0.125)
