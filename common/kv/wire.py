"""Bytes on the wire for exported KV: one chunk per page of one layer, plus one state chunk per compressed layer.

Chunk = header (format.WIRE_HEADER, little-endian) + payload + CRC32 trailer (zlib.crc32 of header + payload,
little-endian uint32). The payload is the chunk's tensors back to back as raw little-endian bytes, C order:
    page chunk   the fields of `KVLayout.page_fields(with_sums=False)` in order, each [Hkv, rows, width]
    state chunk  sink_k, sink_v [Hkv, num_sink_tokens, D] then tail_k, tail_v [Hkv, num_tokens, D], in the
                 layout's float_dtype (fp16 or bf16: KVLayout.wire_identity, checked by the KVHeader's kv_format)
Header fields: magic b"HKVC", version, kind (0 page, 1 state), mode (index in config.MODES), bits (with K's in
the high nibble where key_bits differs: `wire_bits`), key_axis
(index in config.KEY_AXES), partition, num_kv_heads, head_dim, layer, index (page number within the layer; 0
for state), num_tokens (page tokens, or tail tokens for state), num_sink_tokens (0 for pages).
A receiver decodes only chunks whose mode/bits/key_axis/partition/heads/head_dim match its own layout.
"""
from __future__ import annotations

import math
import sys
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy
import torch

from common.kv.config import KEY_AXES, MODES, KVConfig
from common.kv.format import (STATE_FIELDS, WIRE_HEADER, WIRE_MAGIC, WIRE_TRAILER, WIRE_VERSION,
                              KVLayout, LayerKV, page_groups)

PAGE, STATE = 0, 1


class WireFormatError(ValueError):
    """A chunk is truncated, from another format version, or from an incompatible layout."""


class WireChecksumError(WireFormatError):
    """A chunk's CRC32 does not match its bytes: corrupted in transit (worth a resend, unlike a format error)."""


@dataclass(frozen=True)
class Chunk:
    kind: int  # PAGE or STATE
    layer: int
    index: int
    num_tokens: int
    tensors: dict[str, torch.Tensor]


class ChunkHeader(NamedTuple):
    kind: int
    layer: int
    index: int
    num_tokens: int
    num_sinks: int


def crc32(data: bytes | bytearray | memoryview) -> int:
    """The checksum used in every chunk's trailer (zlib CRC32, unsigned)."""
    return zlib.crc32(data) & 0xFFFFFFFF


def encode_page(layout: KVLayout, layer: int, index: int, page: dict[str, torch.Tensor]) -> bytes:
    """One page of one layer ({field: [Hkv, rows, width]} of its filled slots) -> chunk bytes."""
    fields = layout.page_fields(with_sums=False)
    num_tokens = page[fields[0].name].shape[1]  # k_codes / k hold one row per token
    tensors = [_checked(page, f.name, f.shape(layout.num_kv_heads, num_tokens), f.dtype) for f in fields]
    return _frame(layout, PAGE, layer, index, num_tokens, 0, tensors)


def encode_state(layout: KVLayout, layer: int, state: dict[str, torch.Tensor]) -> bytes:
    """The sinks and open tail of one layer of a compressed sequence -> chunk bytes."""
    h, d = layout.num_kv_heads, layout.head_dim
    sinks, tail = state["sink_k"].shape[1], state["tail_k"].shape[1]
    tokens = {"sink_k": sinks, "sink_v": sinks, "tail_k": tail, "tail_v": tail}
    tensors = [_checked(state, name, (h, tokens[name], d), layout.float_dtype) for name in STATE_FIELDS]
    return _frame(layout, STATE, layer, 0, tail, sinks, tensors)


def encode_layer(layout: KVLayout, layer: int, kv: LayerKV) -> list[bytes]:
    """All chunks of one exported layer: its pages in order, then (compressed modes) its state. Host tensors are
    framed straight from their memory (the export's one host buffer per field): one copy, into the chunk."""
    chunks = [encode_page(layout, layer, i, page) for i, page in enumerate(kv.pages)]
    if layout.config.compressed:
        chunks.append(encode_state(layout, layer, kv.state))
    return chunks


def decode_chunk(layout: KVLayout, data: bytes | bytearray | memoryview) -> Chunk:
    """Parse and verify one chunk against the receiver's layout; WireFormatError on any mismatch."""
    data = memoryview(data)
    header = _verified_header(layout, data)
    tensors = _read_tensors(_payload(data), chunk_specs(layout, header))
    return Chunk(header.kind, header.layer, header.index, header.num_tokens, tensors)


def decode_layer(layout: KVLayout, chunks: list[bytes]) -> LayerKV:
    """Inverse of encode_layer (chunks in any order); checks they form one complete layer. Every page field
    lands in one host tensor [pages, Hkv, rows per page, width] (one copy out of the wire bytes; the pages of the
    result are views of it), ready for one host-to-device copy and one scatter per field."""
    views = [memoryview(c) for c in chunks]
    headers = [_verified_header(layout, v) for v in views]
    if len({h.layer for h in headers}) > 1:
        raise WireFormatError(f"chunks of several layers given: {sorted({h.layer for h in headers})}")
    order = sorted((i for i, h in enumerate(headers) if h.kind == PAGE), key=lambda i: headers[i].index)
    if [headers[i].index for i in order] != list(range(len(order))):
        raise WireFormatError(f"page chunks {[headers[i].index for i in order]} are not 0..{len(order) - 1}")
    states = [i for i, h in enumerate(headers) if h.kind == STATE]
    if len(states) != int(layout.config.compressed):
        raise WireFormatError(f"expected {int(layout.config.compressed)} state chunk(s), got {len(states)}")
    stacked = _stack_pages(layout, [views[i] for i in order], [headers[i] for i in order])
    counts = [headers[i].num_tokens for i in order]
    state = _read_tensors(_payload(views[states[0]]), chunk_specs(layout, headers[states[0]])) if states else {}
    num_tokens = sum(counts)
    if states:
        num_tokens += state["sink_k"].shape[1] + state["tail_k"].shape[1]
    return LayerKV.from_stacked(layout, num_tokens, stacked, counts, state)


def _stack_pages(layout: KVLayout, views: list[memoryview], headers: list[ChunkHeader]
                 ) -> list[dict[str, torch.Tensor]]:
    """Copy each page chunk's fields into per-field host tensors [group pages, Hkv, rows per page, width], one
    per `page_groups` group; the rows of a partial last page past its tokens are zeroed."""
    h, bs = layout.num_kv_heads, layout.config.block_size
    fields = layout.page_fields(with_sums=False)
    groups = []
    for start, stop in page_groups(layout, len(views)):
        group = {f.name: torch.empty((stop - start, h, f.rows(bs), f.width), dtype=f.dtype) for f in fields}
        raw = {name: t.view(torch.uint8).numpy() for name, t in group.items()}  # [pages, Hkv, rows, width bytes]
        for page in range(start, stop):
            _copy_page(views[page], headers[page], fields, h, bs, raw, page - start)
        groups.append(group)
    return groups


def _copy_page(view: memoryview, header: ChunkHeader, fields: list, h: int, bs: int, raw: dict, index: int) -> None:
    if header.num_tokens > bs:
        raise WireFormatError(f"page chunk of {header.num_tokens} tokens, more than a page's {bs}")
    payload, offset = _payload(view), 0
    expected = sum(f.nbytes(h, header.num_tokens) for f in fields)
    if len(payload) != expected:
        raise WireFormatError(f"payload has {len(payload)} bytes, the header implies {expected}")
    for f in fields:
        n, rows = f.nbytes(h, header.num_tokens), f.rows(header.num_tokens)
        raw[f.name][index, :, :rows] = numpy.frombuffer(payload[offset: offset + n], numpy.uint8).reshape(h, rows, -1)
        raw[f.name][index, :, rows:] = 0  # a partial page's unused rows
        offset += n


def frame_header(layout: KVLayout, kind: int, layer: int, index: int, num_tokens: int, num_sinks: int) -> bytes:
    if sys.byteorder != "little":
        raise RuntimeError("the KV wire format is little-endian; big-endian hosts are not supported")
    cfg = layout.config
    return WIRE_HEADER.pack(WIRE_MAGIC, WIRE_VERSION, kind, MODES.index(cfg.mode), wire_bits(cfg),
                            KEY_AXES.index(cfg.key_axis), cfg.partition, layout.num_kv_heads, layout.head_dim,
                            layer, index, num_tokens, num_sinks)


def _frame(layout: KVLayout, kind: int, layer: int, index: int, num_tokens: int, num_sinks: int,
           tensors: list[torch.Tensor]) -> bytes:
    """header + payload + CRC in one join: each tensor's bytes are read in place (host, contiguous: a view of the
    export buffer) rather than copied out first."""
    parts = [frame_header(layout, kind, layer, index, num_tokens, num_sinks), *map(_host_bytes, tensors)]
    checksum = 0
    for part in parts:
        checksum = zlib.crc32(part, checksum)
    parts.append(WIRE_TRAILER.pack(checksum & 0xFFFFFFFF))
    return b"".join(parts)


def _host_bytes(tensor: torch.Tensor) -> memoryview:
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    return memoryview(tensor.contiguous().view(torch.uint8).numpy().reshape(-1))


def _checked(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    x = tensors.get(name)
    if x is None or tuple(x.shape) != tuple(shape) or x.dtype != dtype:
        got = "missing" if x is None else f"{tuple(x.shape)} {x.dtype}"
        raise ValueError(f"{name} must be {tuple(shape)} {dtype}, got {got}")
    return x


def wire_bits(cfg: KVConfig) -> int:
    """The header's bits byte: V's bits, with K's in the high nibble only where they differ."""
    return cfg.bits if cfg.k_bits == cfg.bits else cfg.bits | cfg.k_bits << 4


def _check_layout(layout: KVLayout, mode: int, bits: int, key_axis: int, partition: int, heads: int,
                  head_dim: int) -> None:
    cfg = layout.config
    theirs = (MODES[mode] if mode < len(MODES) else mode, bits, KEY_AXES[key_axis] if key_axis < len(KEY_AXES)
              else key_axis, partition, heads, head_dim)
    ours = (cfg.mode, wire_bits(cfg), cfg.key_axis, cfg.partition, layout.num_kv_heads, layout.head_dim)
    if not cfg.compressed:  # fp16 pages do not depend on the quantization settings
        theirs, ours = (theirs[0], *theirs[4:]), (ours[0], *ours[4:])
    if theirs != ours:
        raise WireFormatError(f"chunk layout (mode, bits, key_axis, partition, kv heads, head_dim) {theirs} "
                              f"does not match this pool's {ours}")


TensorSpec = tuple[str, tuple[int, ...], torch.dtype]  # name, shape, dtype


def parse_header(layout: KVLayout, data: memoryview) -> ChunkHeader:
    """A chunk's header, checked against the receiver's layout (magic, version, mode and shape)."""
    (magic, version, kind, mode, bits, key_axis, partition, heads, head_dim, layer, index, num_tokens,
     num_sinks) = WIRE_HEADER.unpack_from(data, 0)
    if magic != WIRE_MAGIC or version != WIRE_VERSION:
        raise WireFormatError(f"not a version {WIRE_VERSION} KV chunk (magic {magic!r}, version {version})")
    _check_layout(layout, mode, bits, key_axis, partition, heads, head_dim)
    if kind not in (PAGE, STATE):
        raise WireFormatError(f"unknown chunk kind {kind}")
    return ChunkHeader(kind, layer, index, num_tokens, num_sinks)


def chunk_specs(layout: KVLayout, header: ChunkHeader) -> list[TensorSpec]:
    """The tensors a chunk's payload holds, in order."""
    heads, head_dim = layout.num_kv_heads, layout.head_dim
    if header.kind == PAGE:
        return [(f.name, f.shape(heads, header.num_tokens), f.dtype) for f in layout.page_fields(with_sums=False)]
    tokens = {"sink_k": header.num_sinks, "sink_v": header.num_sinks, "tail_k": header.num_tokens,
              "tail_v": header.num_tokens}
    return [(name, (heads, tokens[name], head_dim), layout.float_dtype) for name in STATE_FIELDS]


def _verified_header(layout: KVLayout, data: memoryview) -> ChunkHeader:
    if len(data) < WIRE_HEADER.size + WIRE_TRAILER.size:
        raise WireFormatError(f"chunk of {len(data)} bytes is shorter than its header and trailer")
    (expected_crc,) = WIRE_TRAILER.unpack_from(data, len(data) - WIRE_TRAILER.size)
    if crc32(data[: -WIRE_TRAILER.size]) != expected_crc:
        raise WireChecksumError("KV chunk checksum mismatch (corrupted in transit)")
    return parse_header(layout, data)


def _payload(data: memoryview) -> memoryview:
    return data[WIRE_HEADER.size: -WIRE_TRAILER.size]


def _read_tensors(payload: memoryview, specs: list[TensorSpec]) -> dict[str, torch.Tensor]:
    expected = sum(_nbytes(shape, dtype) for _, shape, dtype in specs)
    if len(payload) != expected:
        raise WireFormatError(f"payload has {len(payload)} bytes, the header implies {expected}")
    tensors, offset = {}, 0
    for name, shape, dtype in specs:
        n = _nbytes(shape, dtype)
        owned = torch.empty(shape, dtype=dtype)  # one copy: aligned, owned, writable
        owned.view(torch.uint8).numpy().reshape(-1)[:] = numpy.frombuffer(payload[offset: offset + n], numpy.uint8)
        tensors[name] = owned
        offset += n
    return tensors


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize
