"""wire.py: chunk encode/decode round trip, exact sizes, checksum and layout checks."""
from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest
import torch

from common.kv.config import PAPER_SETTING, KVConfig
from common.kv.factory import make_kv_backend
from common.kv.format import WIRE_HEADER, KVLayout
from common.kv.interface import ForwardBatch
from common.kv.wire import WireChecksumError, WireFormatError, crc32, decode_chunk, decode_layer, encode_layer

MODEL = SimpleNamespace(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64)


def _prefilled(cfg: KVConfig, n: int):
    backend = make_kv_backend(cfg, MODEL, "cpu", torch.float32, max_tokens=512, max_seqs=2)
    batch = ForwardBatch.build([0], [0], [n])
    backend.reserve(batch)
    gen = torch.Generator().manual_seed(n)
    q, k, v = torch.randn(n, 4, 64, generator=gen), torch.randn(n, 2, 64, generator=gen), torch.randn(n, 2, 64,
                                                                                                     generator=gen)
    for layer in range(MODEL.num_layers):
        backend.attend(layer, q, k, v, batch)
    return backend


CONFIGS = [
    KVConfig(**PAPER_SETTING, partition=32, block_size=64, num_sinks=3),
    KVConfig(**PAPER_SETTING, partition=32, key_axis="channel", bits=4),
    KVConfig(**PAPER_SETTING, mode="dequant", partition=64),
    KVConfig(**PAPER_SETTING, mode="fp16", partition=32),
    KVConfig(**PAPER_SETTING, partition=32, num_sinks=2, key_bits=4),
    KVConfig(partition=32, num_sinks=2, window=8, token_scales=True),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.mode}-{c.key_axis}-{c.k_bits}/{c.bits}b")
@pytest.mark.parametrize("n", [1, 17, 130])
def test_layer_round_trip_is_exact_and_sized_as_accounted(cfg: KVConfig, n: int) -> None:
    backend = _prefilled(cfg, n)
    layout = backend.layout
    kv = backend.export_layer(0, 1)
    chunks = encode_layer(layout, 1, kv)
    assert sum(len(c) for c in chunks) == layout.wire_bytes(n)
    back = decode_layer(layout, list(reversed(chunks)))  # order on the wire does not matter
    assert back.num_tokens == n and len(back.pages) == len(kv.pages)
    for page, page_back in zip(kv.pages, back.pages):
        assert page.keys() == page_back.keys() and all(torch.equal(page[f], page_back[f]) for f in page)
    assert kv.state.keys() == back.state.keys() and all(torch.equal(kv.state[f], back.state[f]) for f in kv.state)


def test_import_from_the_wire_decodes_like_the_source() -> None:
    cfg = KVConfig(**PAPER_SETTING, partition=32, num_sinks=2)
    source, target = _prefilled(cfg, 75), make_kv_backend(cfg, MODEL, "cpu", torch.float32, max_tokens=512)
    target.allocate_sequence(4, 75)
    for layer in range(MODEL.num_layers):
        target.import_layer(4, layer, decode_layer(target.layout, encode_layer(source.layout, layer,
                                                                                source.export_layer(0, layer))))
    q, k, v = torch.randn(1, 4, 64), torch.randn(1, 2, 64), torch.randn(1, 2, 64)
    outs = []
    for backend, seq in ((source, 0), (target, 4)):
        batch = ForwardBatch.build([seq], [75], [1])
        backend.reserve(batch)
        outs.append(backend.attend(1, q, k, v, batch))
    assert torch.equal(*outs)


def test_checksum_mismatch_is_detected() -> None:
    backend = _prefilled(KVConfig(**PAPER_SETTING, partition=32), 40)
    chunk = bytearray(encode_layer(backend.layout, 0, backend.export_layer(0, 0))[0])
    assert crc32(chunk[:-4]) == struct.unpack("<I", chunk[-4:])[0]
    chunk[WIRE_HEADER.size + 5] ^= 0x10
    with pytest.raises(WireChecksumError, match="checksum"):
        decode_chunk(backend.layout, chunk)
    with pytest.raises(WireFormatError, match="shorter"):
        decode_chunk(backend.layout, b"HKVC")


def test_incompatible_layout_version_and_incomplete_layers_are_rejected() -> None:
    backend = _prefilled(KVConfig(**PAPER_SETTING, partition=32), 70)
    chunks = encode_layer(backend.layout, 0, backend.export_layer(0, 0))
    with pytest.raises(WireFormatError, match="does not match"):
        decode_chunk(KVLayout(KVConfig(**PAPER_SETTING, partition=32, bits=4), 2, 64), chunks[0])
    with pytest.raises(WireFormatError, match="does not match"):  # 4-bit keys read as 2-bit ones
        decode_chunk(KVLayout(KVConfig(**PAPER_SETTING, partition=32, key_bits=4), 2, 64), chunks[0])
    with pytest.raises(WireFormatError, match="page chunks"):
        decode_layer(backend.layout, chunks[1:])
    with pytest.raises(WireFormatError, match="state chunk"):
        decode_layer(backend.layout, chunks[:-1])
    other_version = bytearray(chunks[0])
    other_version[4:6] = (2).to_bytes(2, "little")
    other_version[-4:] = crc32(other_version[:-4]).to_bytes(4, "little")
    with pytest.raises(WireFormatError, match="version 1"):
        decode_chunk(backend.layout, other_version)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.mode}-{c.key_axis}-{c.k_bits}/{c.bits}b")
@pytest.mark.parametrize("n", [1, 17, 130])
def test_export_wire_import_copies_the_pool_byte_for_byte(cfg: KVConfig, n: int) -> None:
    """The vectorized export (one gather per field), the framing from its buffers and the import (one copy and
    one scatter per field) leave the target pool holding exactly the source's bytes, sums included."""
    from common.kv.reference import gather_rows

    source = _prefilled(cfg, n)
    target = make_kv_backend(cfg, MODEL, "cpu", torch.float32, max_tokens=512, max_seqs=2)
    target.allocate_sequence(9, 40)  # another sequence first: the target's pages differ from the source's
    target.allocate_sequence(4, n)
    for layer in range(MODEL.num_layers):
        target.import_layer(4, layer, decode_layer(target.layout, encode_layer(source.layout, layer,
                                                                                source.export_layer(0, layer))))
    stored = sum(source.layout.page_token_counts(n))
    for layer in range(MODEL.num_layers):
        for f in source.layout.page_fields():
            rows = [gather_rows(b.pool.layers[layer], f.name, b.pool.block_tables([s])[0], 0, stored,
                                cfg.block_size) for b, s in ((source, 0), (target, 4))]
            assert torch.equal(rows[0].view(torch.uint8), rows[1].view(torch.uint8)), (layer, f.name)
        split = source.layout.split(n)
        for name, count in (("sink_k", split.sinks), ("sink_v", split.sinks), ("tail_k", split.tail),
                            ("tail_v", split.tail)) if cfg.compressed else ():
            a = source.pool.layers[layer][name][source.pool.state_slot(0), :, :count]
            b = target.pool.layers[layer][name][target.pool.state_slot(4), :, :count]
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (layer, name)
