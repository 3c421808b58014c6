"""backends.py and factory.py against the KVBackend interface, with random q/k/v."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from common.kv import reference
from common.kv.backends import PagedKVBackend
from common.kv.config import KVConfig
from common.kv.factory import make_kv_backend
from common.kv.interface import ForwardBatch, KVCacheFull

MODEL = SimpleNamespace(num_layers=2, num_heads=8, num_kv_heads=2, head_dim=64)
MODES = ["fp16", "dequant", "hack"]


def _backend(mode: str = "hack", max_tokens: int = 1024, **overrides) -> PagedKVBackend:
    cfg = KVConfig(mode=mode, partition=32, block_size=64, num_sinks=2, **overrides)
    return make_kv_backend(cfg, MODEL, "cpu", torch.float32, max_tokens=max_tokens, max_seqs=4)


def _qkv(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 8, 64, generator=gen), torch.randn(n, 2, 64, generator=gen),
            torch.randn(n, 2, 64, generator=gen))


def _forward(backend: PagedKVBackend, seq_ids: list[int], num_new: list[int], seed: int = 0) -> list[torch.Tensor]:
    """reserve + attend on every layer for one packed batch; returns each layer's output."""
    batch = ForwardBatch.build(seq_ids, [backend.num_tokens(s) for s in seq_ids], num_new)
    backend.reserve(batch)
    q, k, v = _qkv(batch.num_tokens, seed)
    return [backend.attend(layer, q + layer, k, v, batch) for layer in range(MODEL.num_layers)]


@pytest.mark.parametrize("mode", MODES)
def test_a_batch_gives_what_each_sequence_gives_alone(mode: str) -> None:
    together = _backend(mode)
    out = _forward(together, [5, 9], [17, 40], seed=1)[1]
    q, k, v = _qkv(57, seed=1)
    for seq_id, rows in ((5, slice(0, 17)), (9, slice(17, 57))):
        alone = _backend(mode)
        batch = ForwardBatch.build([seq_id], [0], [rows.stop - rows.start])
        alone.reserve(batch)
        alone.attend(0, q[rows], k[rows], v[rows], batch)
        assert torch.allclose(alone.attend(1, q[rows] + 1, k[rows], v[rows], batch), out[rows], atol=1e-6)
    decode = _forward(together, [9, 5], [1, 1], seed=2)[0]
    assert decode.shape == (2, 8, 64) and torch.isfinite(decode).all()


def test_fp16_backend_is_float_attention_on_fp16_kv() -> None:
    backend = _backend("fp16")
    out = _forward(backend, [0], [70], seed=3)[0]
    q, k, v = _qkv(70, seed=3)
    expected = reference.causal_attention(q, k.half().transpose(0, 1), v.half().transpose(0, 1), 64**-0.5)
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["dequant", "hack"])
@pytest.mark.parametrize("key_axis", ["token", "channel"])
def test_chunked_prefill_stores_what_one_prefill_stores(mode: str, key_axis: str) -> None:
    q, k, v = _qkv(90, seed=4)
    one, chunked = _backend(mode, key_axis=key_axis), _backend(mode, key_axis=key_axis)
    whole = ForwardBatch.build([0], [0], [90])
    one.reserve(whole)
    expected = one.attend(0, q, k, v, whole)
    for start, n in ((0, 31), (31, 1), (32, 58)):
        part = ForwardBatch.build([0], [start], [n])
        chunked.reserve(part)
        got = chunked.attend(0, q[start : start + n], k[start : start + n], v[start : start + n], part)
    # Earlier chunks saw their partitions still open (16-bit); the last one sees exactly the one-shot state.
    assert torch.allclose(got, expected[32:], atol=1e-5)
    live = {"sink_k": 2, "sink_v": 2, "tail_k": 88 % 32, "tail_v": 88 % 32}  # stale slots beyond are never read
    for name, tensor in one.pool.layers[0].items():
        n = live.get(name, tensor.shape[2])
        assert torch.equal(tensor[:, :, :n], chunked.pool.layers[0][name][:, :, :n]), name


def test_hack_and_dequant_backends_agree_closely() -> None:
    hack, dequant = _backend("hack"), _backend("dequant")
    outs = [(_forward(b, [0], [100], seed=5)[0], _forward(b, [0], [1], seed=6)[0]) for b in (hack, dequant)]
    for h, d in zip(*outs):
        assert (h - d).abs().max() < 0.05


def test_float_prefill_uses_the_original_kv_then_decode_reads_codes() -> None:
    backend = _backend("hack", quantized_prefill=False)
    out = _forward(backend, [0], [70], seed=7)[0]
    q, k, v = _qkv(70, seed=7)
    assert torch.allclose(out, reference.causal_attention(q, k.transpose(0, 1), v.transpose(0, 1), 64**-0.5),
                          atol=1e-6)
    q, k, v = _qkv(21, seed=8)
    mixed_batch = ForwardBatch.build([0, 1], [70, 0], [1, 20])  # a decode and a float prefill in one batch
    backend.reserve(mixed_batch)
    mixed = backend.attend(0, q, k, v, mixed_batch)
    assert torch.allclose(mixed[1:], reference.causal_attention(q[1:], k[1:].transpose(0, 1),
                                                                v[1:].transpose(0, 1), 64**-0.5), atol=1e-6)
    quantized = _backend("hack")  # same storage; the decode token reads the codes in both
    _forward(quantized, [0], [70], seed=7)
    decode_batch = ForwardBatch.build([0], [70], [1])
    quantized.reserve(decode_batch)
    assert torch.equal(quantized.attend(0, q[:1], k[:1], v[:1], decode_batch), mixed[:1])


def test_hack_float_prefill_attends_on_the_codes_once_something_is_stored(monkeypatch) -> None:
    q, k, v = _qkv(90, seed=9)
    outs = []
    for quantized_prefill in (True, False):
        backend = _backend("hack", quantized_prefill=quantized_prefill)
        monkeypatch.setattr(backend, "_stored_float", lambda *a: pytest.fail("hack dequantized stored pages"))
        for start, n in ((0, 50), (50, 40)):
            part = ForwardBatch.build([0], [start], [n])
            backend.reserve(part)
            outs.append(backend.attend(0, q[start:start + n], k[start:start + n], v[start:start + n], part))
    assert not torch.equal(outs[0], outs[2])  # the first chunk: codes vs float
    assert torch.equal(outs[1], outs[3])  # the second chunk reads the same codes either way


@pytest.mark.parametrize("mode", MODES)
def test_cache_full_leaves_the_pool_untouched(mode: str) -> None:
    backend = _backend(mode, max_tokens=128)  # two pages
    _forward(backend, [0], [60])
    snapshot = [{name: t.clone() for name, t in layer.items()} for layer in backend.pool.layers]
    used = backend.pool.used_blocks
    with pytest.raises(KVCacheFull):
        backend.reserve(ForwardBatch.build([0, 1], [60, 0], [10, 100]))
    assert backend.pool.used_blocks == used and backend.num_tokens(0) == 60 and backend.num_tokens(1) == 0
    for layer, saved in zip(backend.pool.layers, snapshot):
        assert all(torch.equal(layer[name], saved[name]) for name in saved)
    _forward(backend, [0, 1], [1, 30])  # what fits still runs


@pytest.mark.parametrize("mode", MODES)
def test_free_returns_every_page_and_slot(mode: str) -> None:
    backend = _backend(mode)
    _forward(backend, [0, 1, 2], [5, 70, 130])
    _forward(backend, [2], [1])
    for seq_id in (0, 1, 2):
        backend.free(seq_id)
    assert backend.pool.used_blocks == 0 and backend.pool.free_slots == 4 and backend.num_tokens(2) == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("requant", [True, False])
@pytest.mark.parametrize("prompt", [1, 2, 33, 131])
def test_export_import_round_trip_gives_identical_attention(mode: str, requant: bool, prompt: int) -> None:
    prefill, decode = _backend(mode, requant_elimination=requant), _backend(mode, requant_elimination=requant)
    _forward(prefill, [3], [7], seed=9)  # another sequence first, so page ids differ between the pools
    _forward(prefill, [0], [prompt], seed=10)
    decode.allocate_sequence(11, prompt)
    for layer in range(MODEL.num_layers):
        decode.import_layer(11, layer, prefill.export_layer(0, layer))
    assert decode.num_tokens(11) == prompt
    for step in range(3):
        expected = _forward(prefill, [0], [1], seed=20 + step)
        got = _forward(decode, [11], [1], seed=20 + step)
        assert all(torch.equal(e, g) for e, g in zip(expected, got)), step


def test_import_validates_its_input() -> None:
    prefill, decode = _backend(), _backend()
    _forward(prefill, [0], [50])
    kv = prefill.export_layer(0, 0)
    with pytest.raises(ValueError, match="holds 0 tokens"):
        decode.import_layer(0, 0, kv)
    decode.allocate_sequence(0, 50)
    with pytest.raises(ValueError, match="already exists"):
        decode.allocate_sequence(0, 50)
    broken = dataclasses.replace(kv, state={**kv.state, "tail_k": kv.state["tail_k"][:, :3]})
    with pytest.raises(ValueError, match="tail_k"):
        decode.import_layer(0, 0, broken)
    with pytest.raises(KVCacheFull):
        _backend(max_tokens=64).allocate_sequence(1, 200)


def test_bad_batches_and_tensors_get_clear_errors() -> None:
    backend = _backend()
    _forward(backend, [0], [10])
    with pytest.raises(ValueError, match="batch has 0 cached tokens, the KV cache has 10"):
        backend.reserve(ForwardBatch.build([0], [0], [1]))
    batch = ForwardBatch.build([0], [10], [1])
    q, k, v = _qkv(1, seed=0)
    with pytest.raises(ValueError, match="not reserved"):
        backend.attend(0, q, k, v, batch)
    backend.reserve(batch)
    with pytest.raises(ValueError, match="k must be"):
        backend.attend(0, q, k[:, :1], v, batch)
    with pytest.raises(ValueError, match="dtype"):
        backend.attend(0, q.double(), k, v, batch)
    with pytest.raises(IndexError, match="layer 2"):
        backend.attend(2, q, k, v, batch)


def test_factory_sizes_the_pool_and_validates() -> None:
    config = KVConfig(partition=64)  # pages of 64 tokens
    by_tokens = make_kv_backend(config, MODEL, "cpu", torch.float32, max_tokens=1000)
    assert by_tokens.pool.num_blocks == 16
    assert make_kv_backend(KVConfig(), MODEL, "cpu", torch.float32, max_tokens=1000).pool.num_blocks == 8  # Π=128
    budget = by_tokens.pool.layout.block_bytes * 2 * 10 + by_tokens.pool.layout.state_bytes * 2 * 64
    assert make_kv_backend(config, MODEL, "cpu", torch.float32, memory_bytes=budget).pool.num_blocks == 10
    with pytest.raises(ValueError, match="exactly one"):
        make_kv_backend(KVConfig(), MODEL, "cpu", torch.float32)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        make_kv_backend(KVConfig(), SimpleNamespace(num_layers=1, num_heads=6, num_kv_heads=4, head_dim=64), "cpu",
                        torch.float32, max_tokens=64)
