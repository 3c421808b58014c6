"""Decode capacity: requests admitted at once, and decode step time while a long prompt's KV arrives.

    .venv/bin/python -m bench.decode_capacity [--write docs/benchmarks.md]

1. Admission (no model run): requests of `--prompt` tokens with the router's default max_tokens (the rest of the
   context window) admitted by one decode instance's scheduler until it refuses. Before: each request reserved
   prompt + max_tokens pages up front; after: the prompt and the first decoded token, blocks then grow with the
   sequence and a full pool preempts (swap to host). SmolLM2-135M geometry (30 layers, 3 KV heads, head_dim 64,
   context 8,192), the default 512 MiB pool and 64 sequences.
2. Step time while KV arrives (a real DecodeEngine, a random model on CPU): a batch of decoding requests runs
   while the KV of one `--long-prompt`-token request is pushed into the same instance. Before: each layer was
   verified, parsed and written on the model thread, queued between steps like a step; after: staged on the
   import thread, written by the model thread between steps within --kv-import-budget-mb. The KV bytes are
   random (the copies do not depend on the values).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time
from types import SimpleNamespace

import torch

from bench.report import write_section
from common.kv import wire
from common.kv.config import KVConfig
from common.kv.factory import make_kv_backend
from common.kv.format import KVLayout
from common.kv.pool import KVPool
from common.loader import load_model
from common.random_models import RandomModelSpec, write_random_checkpoint
from common.sampling import SamplingParams
from decode_service.engine import DecodeEngine, TokenEvent
from decode_service.runner import DecodeRunner
from decode_service.scheduler import AdmissionError, Scheduler

SECTION = "Decode capacity (bench/decode_capacity.py)"
SMOLLM2 = SimpleNamespace(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, context_window=8192)
STEP_SPEC = RandomModelSpec(hidden_size=256, intermediate_size=512, num_layers=8, num_heads=8, num_kv_heads=4,
                            head_dim=64, max_position_embeddings=32768, seed=1)


def admitted(kv_config: KVConfig, prompt: int, memory_mib: int, max_seqs: int) -> tuple[int, int, int]:
    """(pool blocks, admitted before, admitted after) for requests of `prompt` tokens and default max_tokens."""
    layout = KVLayout(kv_config, SMOLLM2.num_kv_heads, SMOLLM2.head_dim)
    blocks = KVPool.blocks_for_budget(layout, SMOLLM2.num_layers, memory_mib << 20, max_seqs)
    max_tokens = SMOLLM2.context_window - prompt
    before = min(max_seqs, blocks // layout.blocks_for(prompt + max_tokens - 1))
    scheduler = Scheduler(layout, blocks, max_seqs, max_seqs)
    after = 0
    try:
        while True:
            scheduler.admit(f"r{after}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0))
            after += 1
    except AdmissionError:
        pass
    return blocks, before, after


async def step_times(runner: DecodeRunner, batch: int, context: int, long_prompt: int, chunks: list[list[bytes]],
                     inline: bool | None, budget_mib: float) -> tuple[list[float], list[float]]:
    """Step times (s) of `batch` decoding requests while a long prompt's KV arrives (inline: the old way on the
    model thread; False: the import thread; None: no import, the baseline)."""
    blocks = runner.backend.pool.num_blocks
    engine = DecodeEngine(runner, Scheduler(runner.layout, blocks, batch + 1, batch), kv_timeout_s=600,
                          import_budget_bytes=int(budget_mib * 2**20))
    await engine.start()
    params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    queues = []
    for i in range(batch):
        (request,), events = engine.admit(f"d{i}", context, params)
        await engine.on_model_thread(runner.allocate, request.seq_id, context)
        engine.kv_ready(request, [5])
        queues.append(events)
    times: list[float] = []
    import_s: list[float] = []

    async def collect(until: asyncio.Event) -> None:
        while not until.is_set():
            event = await queues[0].get()
            if isinstance(event, TokenEvent) and event.step_s:
                times.append(event.step_s)

    done = asyncio.Event()
    collector = asyncio.create_task(collect(done))
    await asyncio.sleep(0.5)  # steady state
    times.clear()
    if inline is None:
        await asyncio.sleep(2.0)
    else:
        (long_request,), _ = engine.admit("long", long_prompt, SamplingParams(max_tokens=1, temperature=0.0))
        await engine.on_model_thread(runner.allocate, long_request.seq_id, long_prompt)
        if inline:
            imports = [engine.on_model_thread(runner.import_layer, long_request.seq_id, layer, layer_chunks)
                       for layer, layer_chunks in enumerate(chunks)]
        else:
            imports = [engine.import_layer(long_request, layer, layer_chunks) for layer, layer_chunks in enumerate(chunks)]
        started = time.monotonic()
        await asyncio.gather(*imports)
        import_s.append(time.monotonic() - started)
    done.set()
    await collector
    await engine.stop()
    for i in range(batch):
        runner.free(i)
    runner.free(batch)
    return times, import_s


def long_prompt_chunks(layout: KVLayout, num_layers: int, tokens: int) -> list[list[bytes]]:
    source = make_kv_backend(layout.config, SimpleNamespace(num_layers=num_layers, num_heads=8,
                                                            num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim),
                             "cpu", torch.float32, max_tokens=tokens + 256, max_seqs=1)
    source.allocate_sequence(0, tokens)
    for cache in source.pool.layers:
        for tensor in cache.values():
            tensor.view(torch.uint8).random_(0, 256) if tensor.dtype != torch.float16 else tensor.normal_()
    return [wire.encode_layer(layout, layer, source.export_layer(0, layer)) for layer in range(num_layers)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=512, help="cached tokens of each decoding request")
    parser.add_argument("--long-prompt", type=int, default=16384)
    parser.add_argument("--kv-import-budget-mb", type=float, default=32)
    parser.add_argument("--write", help="markdown file whose decode capacity section to replace")
    args = parser.parse_args(argv)
    lines = [f"Admission: requests of {args.prompt} prompt tokens with the default max_tokens (the rest of the "
             f"{SMOLLM2.context_window:,}-token window), SmolLM2-135M geometry, 512 MiB pool, 64 sequences.", "",
             "| KV mode | pool blocks | admitted before | admitted after |", "|---|---|---|---|"]
    for mode in ("hack", "fp16"):
        blocks, before, after = admitted(KVConfig(mode=mode), args.prompt, 512, 64)
        lines.append(f"| {mode} | {blocks:,} | {before} | {after} |")
    print("\n".join(lines), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model(write_random_checkpoint(tmp, STEP_SPEC), dtype="float32", device="cpu")
    config = KVConfig(mode="hack")
    backend = make_kv_backend(config, loaded.config, "cpu", torch.float32, max_seqs=args.batch + 2,
                              max_tokens=(args.batch + 1) * (args.context + 2048) + args.long_prompt)
    runner = DecodeRunner(loaded, backend)
    chunks = long_prompt_chunks(backend.layout, STEP_SPEC.num_layers, args.long_prompt)
    wire_mib = sum(len(c) for layer in chunks for c in layer) / 2**20
    rows = []
    for name, inline in (("no KV arriving", None), ("before: imports on the model thread", True),
                         ("after: import thread + budgeted writes", False)):
        times, import_s = asyncio.run(step_times(runner, args.batch, args.context, args.long_prompt, chunks,
                                                 inline, args.kv_import_budget_mb))
        rows.append(f"| {name} | {f'{import_s[0]:.2f}' if import_s else '-'} | {len(times)} | "
                    f"{1e3 * statistics.median(times):.1f} | {1e3 * max(times):.1f} |")
        print(rows[-1], flush=True)
    lines += ["", f"Decode step time while a {args.long_prompt:,}-token prompt's KV ({wire_mib:.1f} MiB, hack 2-bit) "
              f"arrives: batch {args.batch} at {args.context} cached tokens, random model ({STEP_SPEC.num_layers} "
              f"layers, hidden {STEP_SPEC.hidden_size}, 4 KV heads, head_dim 64), CPU ({platform.machine()}, "
              f"{torch.get_num_threads()} threads), 1-minute load average {os.getloadavg()[0]:.1f}; import budget "
              f"{args.kv_import_budget_mb:g} MiB per step. Command: `python -m bench.decode_capacity`.", "",
              "| KV import | import s | steps meanwhile | median step ms | max step ms |", "|---|---|---|---|---|", *rows]
    print("\n".join(lines[-len(rows) - 4:]))
    if args.write:
        write_section(args.write, SECTION, "\n".join(lines))


if __name__ == "__main__":
    main()
