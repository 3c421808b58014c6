"""Host work of storing a prompt's K/V in the compressed cache (the vectorized torch store, what CUDA runs when the
Triton append cannot: the default format's window and mse ranges): torch ops launched and host syncs per layer.

    .venv/bin/python -m bench.store_ops [--before REF] [--tokens 1024 4096] [--write docs/benchmarks.md]

One layer at Llama-3-8B's KV shape (8 KV heads, head_dim 128), one sequence of `tokens` new tokens stored into
shuffled pages by `torch_fast.store_compressed_kv`, for the default format and the paper's. Columns: wall time on
this CPU (median of --reps), aten ops called and host syncs (aten::item / _local_scalar_dense) counted with
torch.profiler. On a GPU every aten op is a kernel launch (~5-10 us of host time) and every sync a stall, so the
counts are what the store would cost the GPU path's host; the CPU wall time is mostly the quantization arithmetic.
--before REF runs the same measurement on the code of git revision REF in a subprocess, in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from common.kv import torch_fast
from common.kv.config import PAPER_SETTING, KVConfig
from common.kv.format import KVLayout
from common.kv.pool import KVPool

SECTION = "Prompt KV store: ops and host syncs (bench/store_ops.py)"
NUM_KV_HEADS, HEAD_DIM = 8, 128
CONFIGS = {"default format": KVConfig(), "paper format": KVConfig(**PAPER_SETTING)}
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense")


def measure(name: str, tokens: int, reps: int) -> dict:
    config = CONFIGS[name]
    layout = KVLayout(config, NUM_KV_HEADS, HEAD_DIM)
    pool = KVPool(layout, 1, layout.blocks_for(tokens) + 8, 2)
    gen = torch.Generator().manual_seed(tokens)
    pool.allocate({1: 8 * config.block_size, 0: tokens})  # another sequence first: pages not in order
    k, v = (torch.randn(tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen) for _ in "kv")
    args = (k, v, torch.tensor([0, tokens]), torch.zeros(1, dtype=torch.int64), pool.block_tables([0]),
            pool.state_slots([0]), pool.layers[0], config)
    walls = []
    for _ in range(reps):
        start = time.perf_counter()
        torch_fast.store_compressed_kv(*args)
        walls.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch_fast.store_compressed_kv(*args)
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    return {"config": name, "tokens": tokens, "wall_s": statistics.median(walls),
            "aten_ops": sum(e.count for e in events), "syncs": sum(e.count for e in events if e.key in SYNC_OPS)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--before", help="git revision to measure too, as the 'before' columns")
    parser.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--write", help="markdown file whose section to replace")
    args = parser.parse_args(argv)
    after = [measure(name, tokens, args.reps) for name in CONFIGS for tokens in args.tokens]
    if args.json_only:
        for row in after:
            print(json.dumps(row))
        return
    before = [None] * len(after)
    if args.before:
        from bench.report import run_at_revision

        before = run_at_revision(args.before, __file__, ["--tokens", *map(str, args.tokens), "--reps",
                                                          str(args.reps), "--json-only"])
    lines = [f"One layer, {NUM_KV_HEADS} KV heads x head_dim {HEAD_DIM}, one prompt stored by "
             f"torch_fast.store_compressed_kv on CPU ({platform.machine()}, {torch.get_num_threads()} threads), "
             f"median of {args.reps}, 1-minute load average {os.getloadavg()[0]:.1f}"
             + (f"; before = revision {args.before}, same run" if args.before else "")
             + ". Command: `python -m bench.store_ops" + (f" --before {args.before}`." if args.before else "`.")
             + " The op and sync counts are exact (the same on every run); wall time follows the host's load.",
             "", "| format | tokens | aten ops | host syncs | wall s | aten ops before | host syncs before "
                 "| wall s before |", "|---|---|---|---|---|---|---|---|"]
    for row, old in zip(after, before):
        old_cells = f"{old['aten_ops']:,} | {old['syncs']:,} | {old['wall_s']:.2f}" if old else "- | - | -"
        lines.append(f"| {row['config']} | {row['tokens']:,} | {row['aten_ops']:,} | {row['syncs']:,} | "
                     f"{row['wall_s']:.2f} | {old_cells} |")
    print("\n".join(lines))
    if args.write:
        from bench.report import write_section

        write_section(args.write, SECTION, "\n".join(lines))


if __name__ == "__main__":
    main()
