"""Triton dequantize-then-attend decode (the baseline) against reference.dequant_attention."""
from __future__ import annotations

import pytest
import torch

from common.kv import reference
from common.kv.config import PAPER_SETTING, KVConfig
from tests.common.kv.triton_support import (
    DEVICE, FP16_ATTENTION, assert_attention_close, fresh_seed, import_kernels, interpret, nan_like, random_batch,
)

dequant = import_kernels("triton_dequant_decode")
pytestmark = pytest.mark.usefixtures(interpret.__name__)

CASES = [
    pytest.param(KVConfig(**PAPER_SETTING, partition=32, block_size=64, key_axis="token", num_sinks=3), 2, 4, 64, [1, 17, 130], 3,
                 id="gqa4-token-sinks-3splits"),
    pytest.param(KVConfig(**PAPER_SETTING, partition=64, bits=4, key_axis="channel", num_sinks=0, requant_elimination=False), 1, 8,
                 128,
                 [1, 17, 130], None, id="gqa8-channel-4bit-requant"),
    pytest.param(KVConfig(partition=32, num_sinks=2, window=40, rotate=False), 1, 3, 32, [1, 17, 130], 2,
                 id="gqa3-window-2splits"),
    pytest.param(KVConfig(partition=32, num_sinks=2, window=40, rotate=False, key_bits=4), 1, 3, 32, [1, 17, 130], 2,
                 id="gqa3-k4-v2-window"),
    pytest.param(KVConfig(partition=32, num_sinks=2, window=40, token_scales=True), 1, 3, 32, [1, 17, 130], 2,
                 id="gqa3-token-scales-window"),
]


@pytest.mark.parametrize("config, num_kv_heads, group, head_dim, seq_lens, num_splits", CASES)
def test_dequant_decode_matches_reference(config, num_kv_heads, group, head_dim, seq_lens, num_splits):
    seed = fresh_seed()
    batch, gen = random_batch(config, num_kv_heads, head_dim, seq_lens, seed, k_scale=2.0)
    q = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, generator=gen).to(DEVICE)
    cu_q = torch.arange(len(seq_lens) + 1, device=DEVICE)
    out = dequant.dequant_decode_attention(q, batch.seq_lens, batch.block_tables, batch.state_slots, batch.cache,
                                           config, head_dim**-0.5, out=nan_like(q), num_splits=num_splits)
    expected = reference.dequant_attention(q, cu_q, batch.seq_lens, batch.block_tables, batch.state_slots,
                                           batch.cache, config, head_dim**-0.5)
    assert_attention_close(out, expected, FP16_ATTENTION, seed)
