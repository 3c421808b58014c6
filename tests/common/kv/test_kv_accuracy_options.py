"""The accuracy options of KVConfig (docs/accuracy.md) against their references, on odd shapes: 17 tokens, partial
pages, one token, GQA 3:1.

  * window: W recent tokens kept 16-bit beyond the open partition. The split, the reference store and attention,
    the fast ops against the reference (store bytes and attention), export/import.
  * ranges="mse": clipped per-partition ranges of least squared error; same layout, so the fast ops follow.
  * rotate: a per-KV-head orthogonal rotation around the ops. Exact in fp32 (rotate, attend, rotate back = plain
    attention to 1e-5), and the rotated backend is plain attention while nothing is quantized yet.
  * key_bits: K codes of their own width. token_scales: a power of two per token and head divides each row
    before the per-channel quantization; the scores and probabilities carry it (homomorphic).
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from common.kv import ops, reference, torch_fast
from common.kv.config import PAPER_SETTING, KVConfig
from common.kv.factory import make_kv_backend
from common.kv.format import (KVLayout, dequantize, quantize, quantize_tokens, rotation_matrices, split_tokens,
                              token_factors, unpack_codes)
from common.kv.interface import ForwardBatch
from common.kv.pool import KVPool
from tests.common.kv.triton_support import (HOMOMORPHIC, Tolerance, assert_attention_close, cumulative, fresh_seed,
                                            poison, random_batch)

FP32 = Tolerance(max=1e-5, p99=1e-6, mean=1e-7)
GQA3 = SimpleNamespace(num_layers=2, num_heads=6, num_kv_heads=2, head_dim=64)  # 3 query heads per KV head


# -- window ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_tokens, window, expected", [
    (1, 20, (1, 0, 0)), (4, 20, (4, 0, 0)), (17, 20, (4, 0, 13)), (55, 20, (4, 0, 51)), (56, 20, (4, 32, 20)),
    (87, 20, (4, 32, 51)), (88, 20, (4, 64, 20)), (88, 0, (4, 64, 20)), (100, 64, (4, 32, 64)),
])
def test_window_split(num_tokens, window, expected) -> None:
    """4 sinks, Π = 32: a partition is quantized once `window` newer tokens follow it."""
    assert tuple(split_tokens(num_tokens, KVConfig(partition=32, window=window))) == expected


def test_window_is_validated_and_sizes_the_tail() -> None:
    with pytest.raises(ValueError, match="window must be >= 0"):
        KVConfig(window=-1)
    layout = KVLayout(KVConfig(partition=32, window=20, token_scales=False), 3, 8)
    assert layout.state_shapes()["tail_k"] == (3, 52, 8)
    assert layout.state_bytes == 2 * 3 * (4 + 52) * 8 * 2
    no_window = KVLayout(KVConfig(**PAPER_SETTING, partition=32), 3, 8)
    assert layout.wire_bytes(88) == no_window.wire_bytes(88)  # the same split at 88 tokens


WINDOW_CASES = [
    pytest.param(KVConfig(partition=32, block_size=64, window=20, num_sinks=4), [1, 17, 130], id="w20-sinks"),
    pytest.param(KVConfig(partition=32, window=64, num_sinks=0, key_axis="token", bits=4), [17, 1, 200],
                 id="w64-token-4bit"),
    pytest.param(KVConfig(partition=32, window=7, num_sinks=4, requant_elimination=False, sum_elimination=False),
                 [130, 17, 1], id="w7-requant"),
    pytest.param(KVConfig(partition=32, window=20, ranges="mse", num_sinks=4), [17, 130, 1], id="w20-mse"),
    pytest.param(KVConfig(partition=64, ranges="mse", num_sinks=0, key_axis="token"), [1, 200, 17], id="mse-token"),
    pytest.param(KVConfig(partition=32, window=20, num_sinks=4, key_bits=4), [17, 130, 1], id="k4-v2"),
    pytest.param(KVConfig(partition=32, num_sinks=0, key_bits=8, key_axis="token", rotate=False), [1, 200, 17],
                 id="k8-v2-token"),
    pytest.param(KVConfig(partition=32, window=20, num_sinks=4, token_scales=True), [17, 130, 1], id="token-scales"),
    pytest.param(KVConfig(partition=32, num_sinks=0, key_axis="token", key_bits=4, token_scales=True,
                          requant_elimination=False), [1, 200, 17], id="token-scales-token-k4-requant"),
]


@pytest.mark.parametrize("op, tolerance", [("hack_attention", HOMOMORPHIC), ("dequant_attention", FP32)])
@pytest.mark.parametrize("config, seq_lens", WINDOW_CASES)
@pytest.mark.parametrize("forward", ["decode", "mixed"])
def test_window_fast_attention_matches_reference(op, tolerance, config, seq_lens, forward) -> None:
    batch, gen = random_batch(config, 2, 64, seq_lens, fresh_seed(), k_scale=2.0)
    counts = [1] * len(seq_lens) if forward == "decode" else [max(1, n // 3) for n in seq_lens]
    q = torch.randn(sum(counts), 6, 64, generator=gen)  # GQA 3:1
    args = (q, cumulative(counts), batch.seq_lens, batch.block_tables, batch.state_slots, batch.cache, config,
            0.125)
    assert_attention_close(getattr(torch_fast, op)(*args), getattr(reference, op)(*args), tolerance)


# (cached, new) per sequence: sinks, decodes through the tail, chunks that flush one and several partitions
WINDOW_STORE_STEPS = [([0, 0, 0], [1, 3, 17]), ([1, 3, 17], [1, 1, 40]), ([2, 4, 57], [1, 1, 1]),
                      ([3, 5, 58], [60, 1, 1]), ([63, 6, 59], [1, 70, 1])]


@pytest.mark.parametrize("config", [c.values[0] for c in WINDOW_CASES])
def test_window_fast_store_writes_the_reference_bytes(config) -> None:
    gen = torch.Generator().manual_seed(fresh_seed())
    pool = KVPool(KVLayout(config, 2, 8), 1, 16, 4)
    pool.allocate({seq: 80 for seq in range(3)})
    poison(pool.layers[0], gen)
    ref_cache = {name: t.clone() for name, t in pool.layers[0].items()}
    tables, slots = pool.block_tables([2, 0, 1]), pool.state_slots([2, 0, 1])
    for cached, new in WINDOW_STORE_STEPS:
        k, v = (torch.randn(sum(new), 2, 8, generator=gen) for _ in "kv")
        args = (k, v, cumulative(new), torch.tensor(cached), tables, slots)
        reference.store_compressed_kv(*args, ref_cache, config)
        torch_fast.store_compressed_kv(*args, pool.layers[0], config)
        for name, expected in ref_cache.items():
            assert torch.equal(pool.layers[0][name].view(torch.uint8), expected.view(torch.uint8)), (name, cached)


def test_window_tokens_are_read_16_bit() -> None:
    """The stored sequence = sinks, dequantized partitions, then the last tail tokens exactly (fp16)."""
    config = KVConfig(partition=32, window=20, num_sinks=4)
    batch, _ = random_batch(config, 2, 8, [87], fresh_seed())
    k, v = reference.dequantize_sequence(batch.cache, batch.block_tables[0], int(batch.state_slots[0]), 87, config)
    tail = batch.cache["tail_k"][int(batch.state_slots[0]), :, :51].float()
    assert k.shape == (2, 87, 8) and torch.equal(k[:, 36:], tail)


def test_window_is_a_store_kernel_gap_only() -> None:
    assert "window" in ops.store_kernel_gap(KVConfig(**(PAPER_SETTING | {"window": 64})), 64)
    assert ops.store_kernel_gap(KVConfig(**PAPER_SETTING), 64) is None
    assert ops.kernel_gap(KVConfig(window=64), 64) is None  # the attention kernels read the window


def _forward(backend, seq_ids: list[int], num_new: list[int], seed: int) -> list[torch.Tensor]:
    batch = ForwardBatch.build(seq_ids, [backend.num_tokens(s) for s in seq_ids], num_new)
    backend.reserve(batch)
    gen = torch.Generator().manual_seed(seed)
    n = batch.num_tokens
    q, k, v = (torch.randn(n, h, 64, generator=gen) for h in (6, 2, 2))
    return [backend.attend(layer, q + layer, k, v, batch) for layer in range(GQA3.num_layers)]


def _backend(**overrides):
    config = KVConfig(**(PAPER_SETTING | {"partition": 32, "block_size": 64, "num_sinks": 2} | overrides))
    return make_kv_backend(config, GQA3, "cpu", torch.float32, max_tokens=1024, max_seqs=4)


@pytest.mark.parametrize("overrides", [{"window": 20}, {"window": 20, "rotate": True}, {"rotate": True},
                                       {"window": 40, "mode": "dequant"}, {"window": 20, "key_bits": 4},
                                       {"window": 20, "token_scales": True}])
@pytest.mark.parametrize("prompt", [1, 17, 131])
def test_export_import_round_trip(overrides, prompt) -> None:
    prefill, decode = _backend(**overrides), _backend(**overrides)
    _forward(prefill, [3], [7], seed=9)
    _forward(prefill, [0], [prompt], seed=10)
    decode.allocate_sequence(11, prompt)
    for layer in range(GQA3.num_layers):
        decode.import_layer(11, layer, prefill.export_layer(0, layer))
    for step in range(3):
        expected, got = _forward(prefill, [0], [1], 20 + step), _forward(decode, [11], [1], 20 + step)
        assert all(torch.equal(e, g) for e, g in zip(expected, got)), step


# -- ranges -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits, gain", [(2, 0.9), (4, 1.0)])
def test_mse_ranges_never_err_more_than_min_max(bits, gain) -> None:
    """The guarantee holds for the parameters the search compares (fp32): min/max is one of its candidates and
    wins ties. Stored as fp16 (rounded outward), either choice can move by a fraction of a percent (seed 36,
    4 bits: 0.4654 vs 0.4626), so the stored form is checked in aggregate only."""
    seed = fresh_seed()
    x = torch.randn(3, 17, 64, generator=torch.Generator().manual_seed(seed))
    x[0, :, 5] = 30.0  # an outlier value in every partition of one row
    for param_dtype in (None, torch.float16):
        errors = {r: (dequantize(quantize(x, bits, ranges=r, param_dtype=param_dtype)) - x).square().sum(-1)
                  for r in ("minmax", "mse")}
        if param_dtype is None:
            assert (errors["mse"] <= errors["minmax"]).all(), f"seed {seed}"
        assert errors["mse"][1:].sum() < gain * errors["minmax"][1:].sum(), f"seed {seed}"  # Gaussian rows


def test_mse_ranges_keep_constant_partitions_exact_and_clamp_the_rest() -> None:
    x = torch.full((2, 32), 1.5)
    x[1] = torch.linspace(-1, 1, 32)
    q = quantize(x, 2, ranges="mse")
    assert torch.equal(dequantize(q)[0], x[0]) and q.scale[0] == 0
    assert q.codes.max() == 3 and q.codes.min() == 0


def test_mse_ranges_change_codes_not_layout() -> None:
    gen = torch.Generator().manual_seed(fresh_seed())
    k, v = (torch.randn(2, 17, 8, generator=gen) for _ in "kv")
    plain, clipped = (quantize_tokens(k, v, KVConfig(partition=32, ranges=r)) for r in ("minmax", "mse"))
    assert {n: t.shape for n, t in plain.items()} == {n: t.shape for n, t in clipped.items()}
    with pytest.raises(ValueError, match="ranges"):
        KVConfig(ranges="max")


def test_mse_ranges_are_a_store_kernel_gap(monkeypatch) -> None:
    """The Triton append computes min/max ranges: with ranges=mse the store falls back to the torch ops."""
    calls = []
    monkeypatch.setattr(torch_fast, "store_compressed_kv", lambda *args: calls.append(args))
    k = torch.zeros(1, 1, 64)
    ops.triton_store_compressed_kv(k, k, None, None, None, None, {}, KVConfig(ranges="mse"), None)
    assert len(calls) == 1


# -- rotation ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_kv_heads, head_dim", [(2, 64), (3, 8), (1, 24)])  # 24: not a power of two
def test_rotation_matrices_are_orthogonal_and_seeded(num_kv_heads, head_dim) -> None:
    rotations = rotation_matrices(num_kv_heads, head_dim, seed=0)
    eye = torch.eye(head_dim).expand(num_kv_heads, -1, -1)
    assert torch.allclose(rotations @ rotations.mT, eye, atol=1e-6)
    assert torch.equal(rotations, rotation_matrices(num_kv_heads, head_dim, seed=0))
    assert not torch.equal(rotations, rotation_matrices(num_kv_heads, head_dim, seed=1))


@pytest.mark.parametrize("num_kv_heads, head_dim, seq_len, queries", [(2, 64, 17, 17), (1, 24, 1, 1),
                                                                      (3, 8, 130, 5)])
def test_rotation_is_exact_in_fp32(num_kv_heads, head_dim, seq_len, queries) -> None:
    """Rotate q, K, V; attend in fp32 without quantization; rotate back: plain attention to 1e-5 (GQA 3:1)."""
    gen = torch.Generator().manual_seed(fresh_seed())
    q = torch.randn(queries, 3 * num_kv_heads, head_dim, generator=gen)
    k, v = (torch.randn(seq_len, num_kv_heads, head_dim, generator=gen) for _ in "kv")
    rotations = rotation_matrices(num_kv_heads, head_dim, seed=5)
    plain = reference.causal_attention(q, k.transpose(0, 1), v.transpose(0, 1), head_dim**-0.5)
    rq, rk, rv = (reference.rotate_heads(x, rotations) for x in (q, k, v))
    rotated = reference.causal_attention(rq, rk.transpose(0, 1), rv.transpose(0, 1), head_dim**-0.5)
    assert (reference.rotate_heads(rotated, rotations, inverse=True) - plain).abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["dequant", "hack"])
def test_rotated_backend_is_plain_attention_while_nothing_is_quantized(mode) -> None:
    """2 sinks + 20-token window + Π = 32: up to 53 tokens stay 16-bit, so rotation changes nothing but fp16
    rounding; past that, the rotated backend stores different codes."""
    plain, rotated = _backend(mode=mode, window=20), _backend(mode=mode, window=20, rotate=True)
    for num_new in (17, 1, 30):
        a, b = _forward(plain, [0], [num_new], num_new), _forward(rotated, [0], [num_new], num_new)
        assert all((x - y).abs().max() < 2e-3 for x, y in zip(a, b))
    stored = rotated.pool.layers[0]["tail_k"][0, :, :48].float()
    assert not torch.allclose(stored, plain.pool.layers[0]["tail_k"][0, :, :48].float(), atol=1e-2)


def test_rotation_spreads_an_outlier_channel() -> None:
    """Why it helps: one channel 20x the others becomes a flat profile across channels."""
    k = torch.randn(64, 1, 64)
    k[:, :, 3] *= 20
    rotated = reference.rotate_heads(k, rotation_matrices(1, 64, seed=0))
    assert k.abs().amax(0).max() / k.abs().amax(0).median() > 10
    assert rotated.abs().amax(0).max() / rotated.abs().amax(0).median() < 3


def test_options_flags_round_trip() -> None:
    import argparse

    from common.kv.options import add_kv_arguments, kv_config_from_args, kv_flags

    parser = argparse.ArgumentParser()
    add_kv_arguments(parser)
    for config in (KVConfig(window=64, rotate=True), dataclasses.replace(KVConfig(), rotate=not KVConfig.rotate)):
        assert kv_config_from_args(parser.parse_args(kv_flags(config))) == config


def test_key_bits_size_k_codes_and_cut_the_attention_error() -> None:
    """4-bit keys: K codes twice as wide, V's unchanged, the wire identity says so; less error than 2-bit keys."""
    two, four = (KVConfig(partition=32, window=0, key_bits=bits, token_scales=False) for bits in (0, 4))
    widths = [{f.name: f.width for f in KVLayout(c, 3, 64).page_fields()} for c in (two, four)]
    assert widths[1]["k_codes"] == 2 * widths[0]["k_codes"] and widths[1]["v_codes"] == widths[0]["v_codes"]
    assert "key_bits=4" in four.wire_identity and "key_bits" not in two.wire_identity
    assert ops.kernel_gap(four, 64) is None  # every kernel reads K at its own width
    with pytest.raises(ValueError, match="key_bits"):
        KVConfig(key_bits=3)
    generator = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 3, 128, 64, generator=generator)
    errors = []
    for config in (two, four):
        rows = quantize_tokens(k, v, config)
        k_codes = unpack_codes(rows["k_codes"], config.k_bits).float()
        scale, minimum = (rows[name].float().repeat_interleave(32, 1) for name in ("k_scale", "k_min"))
        back = k_codes * scale + minimum
        errors.append(float((back - k).norm() / k.norm()))
        assert torch.equal(rows["v_codes"], quantize_tokens(k, v, two)["v_codes"])
    assert errors[1] < 0.3 * errors[0]


# -- token scales ------------------------------------------------------------------------------------------------


def test_token_scales_store_exponents_and_keep_small_tokens_resolution() -> None:
    """Rows of very different magnitudes in one group: each token's exponent is round(log2(max |x|)) clamped to
    a nibble (K's low, V's high in kv_exp), the stored rows are 2^e times the codes' values, and small tokens keep
    their own resolution."""
    gen = torch.Generator().manual_seed(fresh_seed())
    magnitudes = torch.exp2(torch.randint(-9, 7, (2, 128, 1), generator=gen).float())
    k, v = (torch.randn(2, 128, 64, generator=gen) * magnitudes for _ in "kv")
    plain, scaled = KVConfig(partition=64, token_scales=False), KVConfig(partition=64, token_scales=True)
    assert "token_scales" in scaled.wire_identity and "token_scales" not in plain.wire_identity
    fields = [f.name for f in KVLayout(scaled, 2, 64).page_fields()]
    assert "kv_exp" in fields and "kv_exp" not in [f.name for f in KVLayout(plain, 2, 64).page_fields()]
    errors = []
    for config in (plain, scaled):
        rows = quantize_tokens(k, v, config)
        paged = dict(rows, k_codes=unpack_codes(rows["k_codes"], 2), v_codes=unpack_codes(rows["v_codes"], 2))
        back_k, back_v = reference.dequantize_paged(paged, config)
        relative = ((back_k - k).norm(dim=-1) / k.norm(dim=-1)).mean() + ((back_v - v).norm(dim=-1) / v.norm(dim=-1)).mean()
        errors.append(float(relative))
    for part, x in (("k", k), ("v", v)):
        expected = torch.exp2(torch.log2(x.abs().amax(-1, keepdim=True)).round().clamp(-8, 7))
        assert torch.equal(token_factors(rows["kv_exp"], part), expected), part
    assert rows["kv_exp"].dtype == torch.uint8 and rows["kv_exp"].shape == (2, 128, 1)
    assert errors[1] < 0.5 * errors[0], errors


@pytest.mark.parametrize("seq_lens", [[17, 130, 1], [200]])
def test_token_scales_hack_attends_on_the_codes_as_dequant(seq_lens) -> None:
    """reference.hack_attention (scores times 2^e, P times 2^e before its 8-bit quantization) stays about as close
    to the dequantized cache's attention as without token scales (the 8-bit q and P are the only difference; P's
    rounding weighs up to 2^(e_max - e) more, 4x for these V rows), GQA 3:1, odd lengths; a zero row stores
    exponent 0."""
    seed, gaps = fresh_seed(), []
    for token_scales in (False, True):
        config = KVConfig(partition=32, window=20, num_sinks=4, token_scales=token_scales)
        batch, gen = random_batch(config, 2, 64, seq_lens, seed)
        q = torch.randn(len(seq_lens), 6, 64, generator=gen)
        args = (q, cumulative([1] * len(seq_lens)), batch.seq_lens, batch.block_tables, batch.state_slots,
                batch.cache, config, 0.125)
        gaps.append(float((reference.hack_attention(*args) - reference.dequant_attention(*args)).abs().mean()))
    assert gaps[1] < 4 * gaps[0] + 1e-6, (seed, gaps)  # 60 seeds here: at most 2.2x
    zero = quantize_tokens(torch.zeros(1, 32, 64), torch.zeros(1, 32, 64), config)
    assert not zero["kv_exp"].any()


def test_token_scales_are_a_store_kernel_gap_only() -> None:
    """The attention kernels read the exponents; the Triton append kernel does not write them (torch_fast does)."""
    assert "token scales" in ops.store_kernel_gap(KVConfig(**(PAPER_SETTING | {"token_scales": True})), 64)
    assert ops.kernel_gap(KVConfig(token_scales=True), 64) is None
