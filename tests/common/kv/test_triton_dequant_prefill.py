"""Triton dequantize-then-attend prefill (the baseline's FlashAttention over the pages) against
reference.dequant_attention (tolerance: triton_support.FP16_ATTENTION).

Odd shapes: full and chunked prefill of 1, 17 and 130 tokens (partial pages, open tails, one token), GQA 3:1 and
4:1, both key axes, sinks, the 16-bit window, and requant_elimination off; bf16 queries attend in bf16.
Each failure names its seed (fresh_seed) so it can be replayed.
"""
from __future__ import annotations

import pytest
import torch

from common.kv import reference
from common.kv.config import PAPER_SETTING, KVConfig
from tests.common.kv.triton_support import (
    DEVICE, FP16_ATTENTION, Tolerance, assert_attention_close, cumulative, fresh_seed, import_kernels, interpret,
    nan_like, random_batch,
)

dequant = import_kernels("triton_dequant_prefill")
pytestmark = pytest.mark.usefixtures(interpret.__name__)

BF16_ATTENTION = Tolerance(max=6e-2, p99=3e-2, mean=6e-3)  # bf16 keeps 8 mantissa bits to fp16's 11 (eps 8e-3)

CASES = [
    # config, KV heads, query heads per KV head, head_dim, tokens stored, of which new queries (None: all)
    pytest.param(KVConfig(**PAPER_SETTING, partition=32, block_size=64, key_axis="token", num_sinks=3), 1, 3, 32,
                 [1, 17, 130], None, torch.float32, id="gqa3-token-sinks-full"),
    pytest.param(KVConfig(partition=32, bits=4, num_sinks=4, window=20, rotate=False), 2, 4, 64,
                 [5, 17, 130], [5, 1, 40], torch.float32, id="gqa4-channel-window-chunked"),
    pytest.param(KVConfig(**PAPER_SETTING, partition=32, num_sinks=0, requant_elimination=False), 1, 3, 16,
                 [1, 17, 70], [1, 17, 3], torch.float32, id="gqa3-requant-chunked"),
    pytest.param(KVConfig(partition=32, num_sinks=2, window=20, rotate=False, key_bits=4), 1, 3, 32,
                 [5, 17, 130], [5, 1, 40], torch.float32, id="gqa3-k4-v2-window-chunked"),
    pytest.param(KVConfig(partition=32, num_sinks=2, window=20, token_scales=True), 1, 3, 32,
                 [5, 17, 130], [5, 1, 40], torch.float32, id="gqa3-token-scales-window-chunked"),
    # head_dim 8 keeps bf16 off tl.dot: Triton's interpreter multiplies bf16 dot operands as raw bits (the
    # sm_90 compile test covers the bf16 dot)
    pytest.param(KVConfig(partition=32, num_sinks=2, window=8, rotate=False), 1, 3, 8, [17, 70], None,
                 torch.bfloat16, id="gqa3-window-bf16"),
]


@pytest.mark.parametrize("config, num_kv_heads, group, head_dim, seq_lens, num_queries, dtype", CASES)
def test_dequant_prefill_matches_reference(config, num_kv_heads, group, head_dim, seq_lens, num_queries, dtype):
    seed = fresh_seed()
    batch, gen = random_batch(config, num_kv_heads, head_dim, seq_lens, seed, k_scale=2.0)
    cu_q = cumulative(num_queries or seq_lens).to(DEVICE)
    num_heads = num_kv_heads * group
    fused = torch.randn(int(cu_q[-1]), num_heads + 2 * num_kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    q = fused[:, :num_heads]  # a strided view, as sliced from a fused qkv projection
    args = (q, cu_q, batch.seq_lens, batch.block_tables, batch.state_slots, batch.cache, config, head_dim**-0.5)
    out = dequant.dequant_prefill_attention(*args, out=nan_like(q), block_m=16)
    expected = reference.dequant_attention(q.float(), *args[1:])
    tolerance = BF16_ATTENTION if dtype == torch.bfloat16 else FP16_ATTENTION
    assert_attention_close(out, expected, tolerance, seed)


def test_dequant_prefill_rejects_mismatched_offsets():
    config = KVConfig(**PAPER_SETTING, partition=32)
    batch, _ = random_batch(config, 1, 64, [3, 4], fresh_seed())
    q = torch.randn(7, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="cu_q"):
        dequant.dequant_prefill_attention(q, cumulative([7]).to(DEVICE), batch.seq_lens, batch.block_tables,
                                          batch.state_slots, batch.cache, config, 0.125)
