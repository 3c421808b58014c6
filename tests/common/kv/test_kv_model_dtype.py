"""Uncompressed K/V in the model's 16-bit compute dtype (KVLayout.float_dtype): a bf16 model's fp16-mode pages,
sinks and tail hold bf16, travel the wire byte for byte, and greedy decoding on them is the model's own bf16
forward; fp32 models keep fp16 storage; a sender and receiver that disagree on the dtype refuse the push."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from common.engine import Engine
from common.kv.config import PAPER_SETTING, KVConfig
from common.kv.factory import make_kv_backend
from common.kv.float_backend import FloatKVBackend
from common.kv.format import KVLayout, float_dtype_for
from common.kv.interface import ForwardBatch
from common.kv.wire import decode_layer, encode_layer
from common.loader import load_model
from common.random_models import RandomModelSpec
from common.sampling import SamplingParams

MODEL = SimpleNamespace(num_layers=2, num_heads=6, num_kv_heads=2, head_dim=32)  # GQA 3:1


@pytest.mark.parametrize("compute, stored", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                             (torch.float32, torch.float16)])
def test_uncompressed_kv_is_stored_in_the_models_16_bit_dtype(compute, stored) -> None:
    assert float_dtype_for(compute) == stored
    fp16_mode = make_kv_backend(KVConfig(mode="fp16"), MODEL, "cpu", compute, max_tokens=64)
    assert {fp16_mode.pool.layers[0][name].dtype for name in ("k", "v")} == {stored}
    hack = make_kv_backend(KVConfig(), MODEL, "cpu", compute, max_tokens=64, max_seqs=2).pool.layers[0]
    assert {hack[name].dtype for name in ("sink_k", "sink_v", "tail_k", "tail_v")} == {stored}
    assert hack["k_scale"].dtype == hack["v_min"].dtype == torch.float16  # quantization parameters stay fp16


def test_the_dtype_is_part_of_the_pushed_identity() -> None:
    config = KVConfig(mode="fp16")
    ours, theirs = (KVLayout(config, 2, 32, dtype) for dtype in (torch.bfloat16, torch.float16))
    assert ours.wire_identity == "fp16 dtype=bfloat16" and ours.wire_identity != theirs.wire_identity
    with pytest.raises(ValueError, match="stored as one of"):
        KVLayout(config, 2, 32, torch.float32)


@pytest.mark.parametrize("config", [KVConfig(mode="fp16"), KVConfig(**PAPER_SETTING, partition=32, num_sinks=3),
                                    KVConfig(partition=32, window=20)], ids=["fp16", "hack-paper", "hack-window"])
@pytest.mark.parametrize("n", [1, 17, 70])
def test_bf16_kv_round_trips_the_wire_byte_for_byte(config, n) -> None:
    gen = torch.Generator().manual_seed(n)
    source, target = (make_kv_backend(config, MODEL, "cpu", torch.bfloat16, max_tokens=256, max_seqs=3)
                      for _ in "st")
    batch = ForwardBatch.build([0], [0], [n])
    source.reserve(batch)
    q, k, v = (torch.randn(n, h, 32, generator=gen).to(torch.bfloat16) for h in (6, 2, 2))
    k[0, 0, :2] = torch.tensor([3e5, 1e-6])  # bf16 values that fp16 storage would turn into inf and 0
    for layer in range(MODEL.num_layers):
        source.attend(layer, q, k + layer, v, batch)
    target.allocate_sequence(8, 30)  # another sequence first: the target's pages and slots differ
    target.allocate_sequence(4, n)
    for layer in range(MODEL.num_layers):
        chunks = encode_layer(source.layout, layer, source.export_layer(0, layer))
        target.import_layer(4, layer, decode_layer(target.layout, chunks))
        again = encode_layer(target.layout, layer, target.export_layer(4, layer))
        assert again == chunks, layer
    if config.mode == "fp16":  # the stored keys are the model's bf16 keys, bit for bit
        stored = source.export_layer(0, 1).pages[0]["k"].transpose(0, 1)
        assert torch.equal(stored, (k + 1)[: stored.shape[0]])
    elif not config.rotate:  # the first token is a sink: kept 16-bit, in bf16 (rotated with rotate)
        assert torch.equal(source.export_layer(0, 0).state["sink_k"][:, 0], k[0])


def test_bf16_greedy_decoding_on_fp16_mode_kv_is_the_models_own_forward(random_checkpoint) -> None:
    """Paged bf16 K/V (fp16 mode) give the same greedy tokens as the model's own bf16 forward over its float
    cache (GQA 3:1; prompts of 17, 1 and 40 tokens in one batch)."""
    spec = RandomModelSpec(num_heads=6, num_kv_heads=2, head_dim=32, hidden_size=192, seed=11)
    loaded = load_model(random_checkpoint(spec), dtype="bfloat16", device="cpu")
    prompts = [torch.randint(3, loaded.config.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (17, 1, 40)]
    params = [SamplingParams(max_tokens=24, temperature=0)] * len(prompts)
    own = Engine(loaded, FloatKVBackend.for_model(loaded.config, dtype=torch.bfloat16)).generate(prompts, params)
    paged_kv = make_kv_backend(KVConfig(mode="fp16"), loaded.config, "cpu", torch.bfloat16, max_tokens=512)
    assert paged_kv.pool.layers[0]["k"].dtype == torch.bfloat16
    paged = Engine(loaded, paged_kv).generate(prompts, params)
    assert [c.token_ids for c in paged] == [c.token_ids for c in own]
