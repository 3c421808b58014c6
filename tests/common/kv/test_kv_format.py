"""format.py: packing, quantization, code sums, layout shapes and byte accounting."""
from __future__ import annotations

import pytest
import torch

from common.kv.config import PAPER_PARTITION, PAPER_SETTING, KVConfig
from common.kv.format import (KVLayout, code_sums, dequantize, pack_codes, quantize, quantize_tokens,
                              unpack_codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(1, 8), (3, 17, 64), (5, 128)])
def test_pack_unpack_round_trip_is_bit_exact(bits: int, shape: tuple[int, ...]) -> None:
    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (*shape[:-1], shape[-1] * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_pack_puts_code_j_at_bit_offset_bits_times_j() -> None:
    codes = torch.tensor([1, 2, 3, 0, 3, 3, 3, 3], dtype=torch.uint8)
    assert pack_codes(codes, 2).tolist() == [1 | 2 << 2 | 3 << 4, 255]
    assert pack_codes(torch.tensor([0xA, 0x5], dtype=torch.uint8), 4).tolist() == [0x5A]


def test_pack_rejects_a_partial_byte() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_codes(torch.zeros(6, dtype=torch.uint8), 2)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_nearest_error_is_at_most_half_the_stored_scale(bits: int) -> None:
    x = torch.randn(33, 64) * torch.rand(33, 1) * 10 + torch.randn(33, 1)
    q = quantize(x, bits)
    assert q.scale.dtype == torch.float16 and q.minimum.dtype == torch.float16
    assert int(q.codes.max()) <= 2**bits - 1
    err = (dequantize(q) - x).abs()
    bound = q.scale.float().unsqueeze(-1) / 2
    assert (err <= bound * (1 + 1e-5) + 1e-6).all()
    assert err.max() > bound.max() / 4  # a real quantizer, not a copy


def test_constant_partition_has_zero_scale_and_is_exact() -> None:
    x = torch.full((2, 64), 0.3).half()  # K/V reach the quantizer as 16-bit values
    q = quantize(x, 2)
    assert torch.equal(q.scale, torch.zeros(2, dtype=torch.float16)) and (q.codes == 0).all()
    assert torch.equal(dequantize(q), x.float())


def test_stochastic_rounding_is_unbiased() -> None:
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(1, 64, generator=gen)
    draws = 4000
    q = quantize(x.expand(draws, 64), 2, "stochastic", gen)
    mean = dequantize(q).mean(0)
    scale = float(q.scale[0])
    # each draw's error is in [-s, s] with variance <= s^2/4: the mean is within 5 standard errors of x
    assert ((mean - x[0]).abs() <= 5 * scale / 2 / draws**0.5).all()
    nearest_bias = (dequantize(quantize(x, 2)) - x).abs().mean()
    assert (mean - x[0]).abs().mean() < nearest_bias / 5


def test_code_sums_along_any_dim() -> None:
    codes = torch.randint(0, 4, (3, 128, 8), dtype=torch.uint8)
    assert torch.equal(code_sums(codes, 64, dim=1), codes.view(3, 2, 64, 8).sum(2).to(torch.int16))
    assert torch.equal(code_sums(codes, 4), codes.view(3, 128, 2, 4).sum(-1).to(torch.int16))


@pytest.mark.parametrize("key_axis", ["token", "channel"])
def test_quantize_tokens_shapes_and_partial_group(key_axis: str) -> None:
    cfg = KVConfig(**PAPER_SETTING, key_axis=key_axis, partition=32)
    k, v = torch.randn(2, 45, 64), torch.randn(2, 45, 64)  # one full group of 32 and a partial one of 13
    rows = quantize_tokens(k, v, cfg)
    layout = KVLayout(cfg, 2, 64)
    for field in layout.page_fields():
        assert rows[field.name].shape == field.shape(2, 45), field.name
    partial = quantize_tokens(k[:, 32:], v[:, 32:], cfg)
    assert torch.equal(rows["v_scale"][:, 1:], partial["v_scale"])  # the partial group has its own scale
    assert torch.equal(rows["v_codes"][:, 32:], partial["v_codes"])
    v_codes = unpack_codes(rows["v_codes"], 2).to(torch.int32)
    assert torch.equal(rows["v_sums"][:, 1].to(torch.int32), v_codes[:, 32:].sum(1))


def test_config_validation_gives_clear_errors() -> None:
    assert KVConfig(**PAPER_SETTING).block_size == 128 and KVConfig(**PAPER_SETTING, partition=32).block_size == 32
    with pytest.raises(ValueError, match="bits"):
        KVConfig(**PAPER_SETTING, bits=3)
    with pytest.raises(ValueError, match="block_size"):
        KVConfig(**PAPER_SETTING, partition=64, block_size=96)
    with pytest.raises(ValueError, match="mode"):
        KVConfig(**PAPER_SETTING, mode="int4")
    with pytest.raises(ValueError, match="unknown KV config keys"):
        KVConfig.from_dict({"bitz": 2})
    assert KVConfig.from_dict({"bits": 4, "key_axis": "channel"}) == KVConfig(bits=4, key_axis="channel")
    with pytest.raises(ValueError, match="head_dim"):
        KVLayout(KVConfig(**PAPER_SETTING, partition=32), 4, 48)


def test_token_split_and_pages() -> None:
    layout = KVLayout(KVConfig(**PAPER_SETTING, partition=32, block_size=64, num_sinks=4), 2, 64)
    assert layout.split(3) == (3, 0, 0)
    assert layout.split(4 + 64 + 32 + 5) == (4, 96, 5)
    assert layout.page_token_counts(4 + 64 + 32 + 5) == [64, 32]
    assert layout.blocks_for(4 + 64 + 32 + 5) == 2
    fp16 = KVLayout(KVConfig(**PAPER_SETTING, mode="fp16", partition=32, num_sinks=4), 2, 64)
    assert fp16.split(70) == (0, 70, 0) and fp16.page_token_counts(70) == [32, 32, 6]


@pytest.mark.parametrize("key_axis", ["token", "channel"])
def test_llama3_8b_layer_wire_bytes_are_under_17_percent_of_fp16(key_axis: str) -> None:
    layout = KVLayout(KVConfig(**PAPER_SETTING, bits=2, partition=64, key_axis=key_axis, num_sinks=0), num_kv_heads=8,
                      head_dim=128)
    n = 4096
    # per token and KV head: 32 + 32 code bytes, 8 bytes of K scale/min, 8 of V scale/min (over 64 tokens)
    payload = n * 8 * (32 + 32 + 8 + 8)
    overhead = (n // 64 + 1) * 34  # 64 page chunks and one state chunk, 34 framing bytes each
    assert layout.wire_bytes(n) == payload + overhead == 2_623_650
    assert layout.fp16_bytes(n) == n * 8 * 128 * 2 * 2
    assert layout.wire_bytes(n) / layout.fp16_bytes(n) == pytest.approx(0.156382, abs=1e-6)
    # in memory the code sums add 4 + 4 bytes per token and KV head, and each sequence has a 16-bit state slot
    state = 64 * 8 * 128 * 2 * 2
    assert layout.memory_bytes(n) == n * 8 * 88 + state


def test_default_config_wire_bytes_with_sinks_and_an_open_tail() -> None:
    layout = KVLayout(KVConfig(partition=PAPER_PARTITION, **PAPER_SETTING), num_kv_heads=8, head_dim=128)  # 4 sinks
    assert layout.split(4096) == (4, 4032, 60)  # 60 tokens stay 16-bit until their partition fills
    assert layout.wire_bytes(4096) / layout.fp16_bytes(4096) == pytest.approx(0.169563, abs=1e-6)
    assert layout.wire_bytes(4100) / layout.fp16_bytes(4100) == pytest.approx(0.157205, abs=1e-6)
