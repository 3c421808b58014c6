"""Per-step host overhead of the decode step: step time minus the model's forward, batch 1, 8 and 32.

    .venv/bin/python -m bench.decode_overhead [--before REF] [--write docs/benchmarks.md]

A tiny random model on CPU (2 layers, hidden 64: the forward is cheap, so the host work shows). For each KV mode
and batch size: `step` = DecodeRunner.step (build the ForwardBatch, reserve pages, block tables and state slots,
validation, forward, sampling); `forward` = the model's forward alone on the same batch with the backend's batch
tensors already built (what is left with no host bookkeeping), right after each step. overhead = step -
forward, minimum over the repetitions (the least disturbed run on a shared host).
--before REF runs the same measurement on the code of git revision REF (extracted with `git archive` into a
temporary directory, run in a subprocess), for a before/after table in one run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from common.kv.config import KVConfig
from common.kv.factory import make_kv_backend
from common.loader import load_model
from common.random_models import RandomModelSpec, write_random_checkpoint
from common.sampling import SamplingParams
from decode_service.runner import DecodeRunner

SECTION = "Decode step host overhead (bench/decode_overhead.py)"
SPEC = RandomModelSpec(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=32, max_position_embeddings=4096, seed=5)
BATCHES = (1, 8, 32)
CONTEXT = 200


def _plan(batch: list) -> object:
    try:
        from decode_service.scheduler import StepPlan
    except ImportError:  # the code before StepPlan took the request list
        return batch
    return StepPlan(batch=batch)


def measure(mode: str, batch_size: int, reps: int, loaded) -> dict:
    backend = make_kv_backend(KVConfig(mode=mode, partition=32), loaded.config, "cpu", torch.float32,
                              max_tokens=batch_size * (CONTEXT + reps + 64), max_seqs=batch_size)
    runner = DecodeRunner(loaded, backend)
    params = SamplingParams(max_tokens=10_000, temperature=0.0)
    requests = []
    for seq_id in range(batch_size):
        runner.allocate(seq_id, CONTEXT)
        requests.append(SimpleNamespace(seq_id=seq_id, prompt_len=CONTEXT, params=params, output_ids=[7],
                                        num_cached=CONTEXT, last_token=7))
    steps, forwards = [], []
    tokens = torch.full((batch_size,), 7)
    for _ in range(reps + 3):  # interleaved, so both see the same machine load
        start = time.perf_counter()
        runner.step(_plan(requests))
        steps.append(time.perf_counter() - start)
        forward_batch = backend._batch_cache[0]  # the step's batch, its tensors already built: forward only
        start = time.perf_counter()
        loaded.model(tokens, forward_batch, backend)
        forwards.append(time.perf_counter() - start)
        for request in requests:
            request.num_cached += 1
            request.output_ids.append(7)
    step, forward = min(steps[3:]), min(forwards[3:])
    return {"mode": mode, "batch": batch_size, "step_ms": 1e3 * step, "forward_ms": 1e3 * forward,
            "overhead_ms": 1e3 * (step - forward)}


def run_all(reps: int) -> list[dict]:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model(write_random_checkpoint(Path(tmp), SPEC), dtype="float32", device="cpu")
    return [measure(mode, batch, reps, loaded) for mode in ("fp16", "hack") for batch in BATCHES]


def run_before(ref: str, reps: int) -> list[dict]:
    """The same measurement on the code of git revision `ref`, in a subprocess."""
    from bench.report import run_at_revision

    return run_at_revision(ref, __file__, ["--reps", str(reps), "--json-only"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--before", help="git revision to measure too, as the 'before' column")
    parser.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--write", help="markdown file whose section to replace")
    args = parser.parse_args(argv)
    after = run_all(args.reps)
    if args.json_only:
        for row in after:
            print(json.dumps(row))
        return
    before = run_before(args.before, args.reps) if args.before else [None] * len(after)
    lines = [f"Tiny random model (2 layers, hidden 64, 4 query / 2 KV heads), {CONTEXT} cached tokens per sequence, "
             f"CPU ({platform.machine()}, {torch.get_num_threads()} threads), minimum of {args.reps} steps, 1-minute "
             f"load average {os.getloadavg()[0]:.1f}. overhead = step - forward (host work outside the model's "
             f"compute)" + (f"; before = revision {args.before}, same run" if args.before else "") +
             ". Command: `python -m bench.decode_overhead" + (f" --before {args.before}`." if args.before else "`."),
             "", "| KV mode | batch | step ms | forward ms | overhead ms | overhead before ms | step before ms |",
             "|---|---|---|---|---|---|---|"]
    for row, old in zip(after, before):
        old_cells = f"{old['overhead_ms']:.2f} | {old['step_ms']:.2f}" if old else "- | -"
        lines.append(f"| {row['mode']} | {row['batch']} | {row['step_ms']:.2f} | {row['forward_ms']:.2f} | "
                     f"{row['overhead_ms']:.2f} | {old_cells} |")
    print("\n".join(lines))
    if args.write:
        from bench.report import write_section

        write_section(args.write, SECTION, "\n".join(lines))


if __name__ == "__main__":
    main()
