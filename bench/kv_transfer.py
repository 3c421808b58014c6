"""KV export/import time per layer: the vectorized transfer path vs the per-page path it replaced, same run.

    .venv/bin/python -m bench.kv_transfer [--tokens 4096 16384] [--write docs/benchmarks.md] [--json]

One layer of Llama-3-8B's KV (8 KV heads, head_dim 128) for one sequence, in the fp16 and hack (2-bit,
Π = 64) pools, on the device given (CPU without a GPU):
  export = `backend.export_layer` + `wire.encode_layer` (pool -> wire chunks, what a prefill instance does per
           layer), import = `wire.decode_layer` + `backend.import_layer` (wire chunks -> another pool).
"Before" is the per-page path as it was (kept below as `legacy_*`): a gather with an `int(block_table[i])`
host sync per page and field, a clone, `.cpu().numpy().tobytes()` and two joins per chunk; on import a
`bytearray` and a clone per tensor, then per-page writes. The pool holds random bytes: the copies do not
depend on the values.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from types import SimpleNamespace
from typing import Callable

import torch

from bench.report import write_section
from common.kv import wire
from common.kv.backends import PagedKVBackend
from common.kv.config import KVConfig
from common.kv.factory import make_kv_backend
from common.kv.format import recompute_sums
from common.kv.reference import gather_rows, write_rows

MODEL = SimpleNamespace(num_layers=1, num_heads=32, num_kv_heads=8, head_dim=128)  # one Llama-3-8B layer
SECTION = "KV transfer (bench/kv_transfer.py)"
MODES = {"fp16": KVConfig(mode="fp16", partition=64), "hack": KVConfig(mode="hack", partition=64)}

# ---------------------------------------------------------------------------------------------------------------
# The per-page path before the vectorized one (same bytes on the wire)
# ---------------------------------------------------------------------------------------------------------------


def legacy_export(backend: PagedKVBackend, seq_id: int, layer: int) -> list[bytes]:
    cache, n = backend.pool.layers[layer], backend.pool.num_tokens(seq_id)
    table = backend.pool.block_tables([seq_id])[0]
    fields = backend.layout.page_fields(with_sums=False)
    chunks, start = [], 0
    for index, count in enumerate(backend.layout.page_token_counts(n)):
        page = [gather_rows(cache, f.name, table, start, count, backend.config.block_size).clone() for f in fields]
        chunks.append(_legacy_frame(backend, wire.PAGE, layer, index, count, 0, page))
        start += count
    if backend.config.compressed:
        split, slot = backend.layout.split(n), int(backend.pool.state_slots([seq_id])[0])
        state = [cache[name][slot, :, :tokens].clone() for name, tokens in
                 (("sink_k", split.sinks), ("sink_v", split.sinks), ("tail_k", split.tail), ("tail_v", split.tail))]
        chunks.append(_legacy_frame(backend, wire.STATE, layer, 0, split.tail, split.sinks, state))
    return chunks


def _legacy_frame(backend: PagedKVBackend, kind: int, layer: int, index: int, num_tokens: int, num_sinks: int,
                  tensors: list[torch.Tensor]) -> bytes:
    header = wire.frame_header(backend.layout, kind, layer, index, num_tokens, num_sinks)
    body = header + b"".join(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes() for t in tensors)
    return body + wire.WIRE_TRAILER.pack(wire.crc32(body))


def legacy_import(backend: PagedKVBackend, seq_id: int, layer: int, chunks: list[bytes]) -> None:
    decoded = sorted((_legacy_decode_chunk(backend, c) for c in chunks), key=lambda c: (c.kind, c.index))
    pages = [c.tensors for c in decoded if c.kind == wire.PAGE]
    state = next((c.tensors for c in decoded if c.kind == wire.STATE), {})
    cache, table = backend.pool.layers[layer], backend.pool.block_tables([seq_id])[0]
    start = 0
    for page, count in zip(pages, backend.layout.page_token_counts(backend.pool.num_tokens(seq_id))):
        rows = {name: t.to(backend.pool.device) for name, t in page.items()}
        if backend.config.compressed and backend.config.sum_elimination:
            rows |= recompute_sums(rows, backend.config, backend.layout.head_dim)
        write_rows(cache, rows, table, start, count, backend.config.block_size)
        start += count
    slot = int(backend.pool.state_slots([seq_id])[0]) if state else 0
    for name, values in state.items():
        cache[name][slot, :, : values.shape[1]] = values.to(backend.pool.device)


def _legacy_decode_chunk(backend: PagedKVBackend, data: bytes) -> wire.Chunk:
    data = memoryview(data)
    (expected_crc,) = wire.WIRE_TRAILER.unpack_from(data, len(data) - wire.WIRE_TRAILER.size)
    if wire.crc32(data[: -wire.WIRE_TRAILER.size]) != expected_crc:
        raise wire.WireChecksumError("KV chunk checksum mismatch")
    header = wire.parse_header(backend.layout, data)
    payload = bytearray(data[wire.WIRE_HEADER.size: -wire.WIRE_TRAILER.size])  # the old copy, then a clone each
    raw = torch.frombuffer(payload, dtype=torch.uint8)
    tensors, offset = {}, 0
    for name, shape, dtype in wire.chunk_specs(backend.layout, header):
        size = torch.Size(shape).numel() * dtype.itemsize
        tensors[name] = raw[offset: offset + size].clone().view(dtype).reshape(shape)
        offset += size
    return wire.Chunk(header.kind, header.layer, header.index, header.num_tokens, tensors)


# ---------------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------------


def filled_backend(config: KVConfig, tokens: int, device: torch.device, seq_id: int = 0) -> PagedKVBackend:
    """A one-layer pool holding one sequence of `tokens` tokens of random bytes (after another sequence, so its
    pages are not 0..n-1)."""
    backend = make_kv_backend(config, MODEL, device, torch.float32, max_tokens=tokens + 4 * config.block_size,
                              max_seqs=2)
    backend.allocate_sequence(seq_id + 1, 1)
    backend.allocate_sequence(seq_id, tokens)
    generator = torch.Generator(device=device).manual_seed(tokens)
    for tensor in backend.pool.layers[0].values():
        raw = tensor.view(torch.uint8)
        raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=generator, device=device))
        if tensor.dtype == torch.float16:  # keep 16-bit values finite
            tensor.copy_(torch.randn(tensor.shape, generator=generator, device=device))
    return backend


def median_s(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(mode: str, tokens: int, device: torch.device, reps: int) -> dict:
    source = filled_backend(MODES[mode], tokens, device)
    target = make_kv_backend(MODES[mode], MODEL, device, torch.float32, max_tokens=tokens + 64, max_seqs=1)
    target.allocate_sequence(0, tokens)
    chunks = wire.encode_layer(source.layout, 0, source.export_layer(0, 0))
    assert chunks == legacy_export(source, 0, 0), "the two export paths must put the same bytes on the wire"
    row = {"mode": mode, "tokens": tokens, "wire_mib": sum(map(len, chunks)) / 2**20,
           "export_before_ms": 1e3 * median_s(lambda: legacy_export(source, 0, 0), device, reps),
           "export_after_ms": 1e3 * median_s(lambda: wire.encode_layer(source.layout, 0, source.export_layer(0, 0)),
                                            device, reps),
           "import_before_ms": 1e3 * median_s(lambda: legacy_import(target, 0, 0, chunks), device, reps),
           "import_after_ms": 1e3 * median_s(
               lambda: target.import_layer(0, 0, wire.decode_layer(target.layout, chunks)), device, reps)}
    return row


HEADER = ["| KV mode | tokens | wire MiB | export before ms | export after ms | speedup | import before ms | "
          "import after ms | speedup |", "|---|---|---|---|---|---|---|---|---|"]


def table_row(r: dict) -> str:
    return (f"| {r['mode']} | {r['tokens']:,} | {r['wire_mib']:.1f} | {r['export_before_ms']:,.1f} | "
            f"{r['export_after_ms']:,.1f} | {r['export_before_ms'] / r['export_after_ms']:.1f}x | "
            f"{r['import_before_ms']:,.1f} | {r['import_after_ms']:,.1f} | "
            f"{r['import_before_ms'] / r['import_after_ms']:.1f}x |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--write", help="markdown file whose KV transfer section to replace")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON lines too")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = [measure(mode, tokens, device, args.reps) for tokens in args.tokens for mode in MODES]
    load = os.getloadavg()[0]
    lines = [f"One layer of Llama-3-8B KV (8 KV heads, head_dim 128), one sequence; {device.type} "
             f"({platform.machine()}, {torch.get_num_threads()} threads), median of {args.reps}, 1-minute load "
             f"average {load:.1f}. Export = pool -> wire chunks (`export_layer` + `encode_layer`), import = wire "
             "chunks -> pool (`decode_layer` + `import_layer`); before = the per-page path it replaced, in the same "
             "run. Command: `python -m bench.kv_transfer`.", "", *HEADER, *map(table_row, rows)]
    print("\n".join(lines))
    if args.json:
        for row in rows:
            print(json.dumps(row))
    if args.write:
        write_section(args.write, SECTION, "\n".join(lines))


if __name__ == "__main__":
    main()
