"""reference.py: the homomorphic product, homomorphic attention and the store path (tail flush, requant)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from common.kv import reference
from common.kv.config import PAPER_SETTING, KVConfig
from common.kv.format import Quantized, dequantize, quantize


def _quantize_columns(b: torch.Tensor, partition: int, bits: int) -> Quantized:
    """B [..., Z, N] quantized per column in partitions of the reduction dim Z."""
    q = quantize(b.mT.unflatten(-1, (-1, partition)), bits)
    return Quantized(q.codes.flatten(-2).mT, q.scale.mT, q.minimum.mT)


def _dequantize_rows(a: Quantized, partition: int) -> torch.Tensor:
    parts = Quantized(a.codes.unflatten(-1, (-1, partition)), a.scale, a.minimum)
    return dequantize(parts).flatten(-2)


@pytest.mark.parametrize("partition", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_homomorphic_matmul_equals_matmul_of_dequantized_operands(partition: int, bits: int) -> None:
    a_float = torch.randn(3, 17, 2 * partition) * 4 + 1
    b_float = torch.randn(3, 2 * partition, 5)
    a = reference.quantize_int8_partitions(a_float, partition)
    b = _quantize_columns(b_float, partition, bits)
    expected = _dequantize_rows(a, partition).double() @ _dequantize_rows(
        Quantized(b.codes.mT, b.scale.mT, b.minimum.mT), partition).double().mT
    got = reference.homomorphic_matmul(a, b, partition)
    assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
    with_sums = reference.homomorphic_matmul(a, b, partition, b_sums=b.codes.unflatten(-2, (-1, partition)).sum(-2))
    assert torch.equal(with_sums, got)


def test_int8_form_is_signed_and_covers_the_range() -> None:
    x = torch.randn(4, 64)
    q = reference.quantize_int8(x)
    assert q.codes.dtype == torch.int8 and int(q.codes.min()) == -128 and int(q.codes.max()) == 127
    assert ((dequantize(q) - x).abs() <= q.scale.unsqueeze(-1) / 2 + 1e-6).all()


def _attention_args(fc, q: torch.Tensor, num_tokens: int):
    cu = torch.tensor([0, q.shape[0]])
    return (q, cu, torch.tensor([num_tokens]), fc.block_tables, fc.state_slots, fc.cache, fc.config,
            q.shape[-1] ** -0.5)


CASES = [  # (q heads, kv heads, head_dim, tokens, sinks): GQA 1/2/4/8, 1 token, 17 tokens, partial partitions
    (8, 8, 8, 1, 0),
    (8, 4, 64, 17, 2),
    (8, 2, 128, 77, 0),
    (8, 1, 64, 130, 3),
]


@pytest.mark.parametrize("key_axis", ["token", "channel"])
@pytest.mark.parametrize("requant", [True, False])
@pytest.mark.parametrize("hq,hkv,d,n,sinks", CASES)
def test_hack_attention_matches_float_attention_on_the_same_dequantized_kv(
    filled, key_axis: str, requant: bool, hq: int, hkv: int, d: int, n: int, sinks: int
) -> None:
    cfg = KVConfig(**PAPER_SETTING, key_axis=key_axis, partition=32, block_size=64, num_sinks=sinks, requant_elimination=requant)
    fc = filled(cfg, hkv, d, n, seed=n)
    q = torch.randn(n, hq, d)
    hack = reference.hack_attention(*_attention_args(fc, q, n))
    dequant = reference.dequant_attention(*_attention_args(fc, q, n))
    # Only Q and P are (INT8) quantized on top of the stored K/V: the gap is a small fraction of V's range.
    stored_k, stored_v = reference.dequantize_sequence(fc.cache, fc.block_tables[0], 0, n, cfg)
    v_range = float(stored_v.max() - stored_v.min())
    assert (hack - dequant).abs().max() <= 0.01 * v_range
    # Against the original float K/V both carry the 2-bit error, and HACK adds almost nothing to it.
    original = reference.causal_attention(q, fc.k.transpose(0, 1), fc.v.transpose(0, 1), d**-0.5)
    err_hack = (hack - original).norm() / original.norm()
    err_dequant = (dequant - original).norm() / original.norm()
    assert err_hack <= err_dequant * 1.05 + 1e-3
    if requant and n - sinks < cfg.partition:  # nothing quantized yet: exact up to fp16 storage
        assert torch.allclose(hack, original, atol=2e-3)


def test_decode_query_matches_last_row_of_prefill(filled) -> None:
    cfg = KVConfig(**PAPER_SETTING, partition=32, num_sinks=1)
    fc = filled(cfg, 2, 64, 70)
    q = torch.randn(70, 4, 64)
    prefill = reference.hack_attention(*_attention_args(fc, q, 70))
    decode = reference.hack_decode_attention(q[-1:], torch.tensor([70]), fc.block_tables, fc.state_slots, fc.cache,
                                             cfg, 64**-0.5)
    assert torch.allclose(decode, prefill[-1:], atol=1e-6)


@pytest.mark.parametrize("key_axis", ["token", "channel"])
def test_sum_elimination_off_recomputes_identical_results(filled, key_axis: str) -> None:
    on = KVConfig(**PAPER_SETTING, partition=32, key_axis=key_axis)
    off = dataclasses.replace(on, sum_elimination=False)
    fc_on, fc_off = filled(on, 2, 64, 75, seed=3), filled(off, 2, 64, 75, seed=3)
    assert "k_sums" in fc_on.cache and "k_sums" not in fc_off.cache
    q = torch.randn(5, 4, 64)
    assert torch.equal(reference.hack_attention(*_attention_args(fc_on, q, 75)),
                       reference.hack_attention(*_attention_args(fc_off, q, 75)))


@pytest.mark.parametrize("key_axis", ["token", "channel"])
@pytest.mark.parametrize("chunk", [1, 7])
def test_appending_in_steps_stores_what_one_quantization_of_the_whole_sequence_stores(
    filled, key_axis: str, chunk: int
) -> None:
    cfg = KVConfig(**PAPER_SETTING, partition=32, block_size=64, num_sinks=3, key_axis=key_axis)
    n = 3 + 64 + 32 + 17  # sinks, a full page, a half page, an open tail of 17
    whole, steps = filled(cfg, 2, 64, n), filled(cfg, 2, 64, n, chunk=chunk)
    assert torch.equal(whole.block_tables, steps.block_tables)
    for name, tensor in whole.cache.items():
        if name.startswith(("sink", "tail")):
            assert torch.equal(tensor[0, :, : 3 if name.startswith("sink") else 17],
                               steps.cache[name][0, :, : 3 if name.startswith("sink") else 17]), name
        else:
            assert torch.equal(tensor[:2], steps.cache[name][:2]), name


def test_requant_off_requantizes_the_open_partition_every_step(filled) -> None:
    cfg = KVConfig(**PAPER_SETTING, partition=32, num_sinks=0, requant_elimination=False)
    fc = filled(cfg, 2, 64, 45, chunk=1)  # one full partition and 13 tokens of the next
    open_part = reference.quantize_tokens(fc.k[32:].transpose(0, 1).half(), fc.v[32:].transpose(0, 1).half(), cfg)
    page = int(fc.block_tables[0, 1])
    assert torch.equal(fc.cache["v_scale"][page, :, :1], open_part["v_scale"])
    assert torch.equal(fc.cache["k_codes"][page, :, :13], open_part["k_codes"])
    assert torch.equal(fc.cache["v_sums"][page, :, :1], open_part["v_sums"])


def test_causal_attention_maps_each_query_head_to_its_kv_group() -> None:
    k, v, q = torch.randn(2, 9, 8), torch.randn(2, 9, 8), torch.randn(9, 4, 8)
    out = reference.causal_attention(q, k, v, 0.5)
    first_of_each_group = q.view(9, 2, 2, 8)[:, :, 0]  # heads 0 and 2 read KV heads 0 and 1
    scores = torch.einsum("qhd,hkd->hqk", first_of_each_group, k) * 0.5
    mask = torch.ones(9, 9, dtype=torch.bool).triu(1)
    first_head = torch.softmax(scores.masked_fill(mask, float("-inf")), -1) @ v
    assert torch.allclose(out[:, 0::2].transpose(0, 1), first_head, atol=1e-6)


def test_stochastic_store_is_reproducible_with_the_seeded_generator(filled) -> None:
    cfg = KVConfig(**PAPER_SETTING, partition=32, rounding="stochastic")
    a, b = filled(cfg, 2, 64, 40, seed=5), filled(cfg, 2, 64, 40, seed=5)
    assert torch.equal(a.cache["k_codes"], b.cache["k_codes"])
    nearest = filled(KVConfig(**PAPER_SETTING, partition=32), 2, 64, 40, seed=5)
    assert not torch.equal(a.cache["k_codes"], nearest.cache["k_codes"])
