"""`n` choices: one request sharing one prefill and one KV push, against n independent one-choice requests.

    .venv/bin/python -m bench.choices [--model DIR|NAME] [--n 1 3 8] [--prompt-len 256] [--write docs/benchmarks.md]

Starts `hack-cluster` (1 prefill, 1 decode), then for each n alternates, `--repeats` times: one completion with
`n` choices (the router sends one Prefill with n; the decode instance copies the prompt's KV into each choice),
and the same work the way the router ran `n` before (n concurrent one-choice requests, seed + i each: n prefills
and n KV pushes). Both sample (temperature 0.8, seeded, ignore_eos), so they generate the same number of tokens.
Reports the median request latency, its ratio to n = 1, and the prefills and KV bytes per request from the
prefill instance's counters.

    .venv/bin/python -m bench.choices --fork-costs

times the decode side's copy alone (`KVPool.fork`, SmolLM2-135M's KV geometry, one thread), no cluster.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import torch

from bench.report import write_section
from common.cluster import Cluster, ClusterConfig
from common.default_model import model_from_env
from common.kv.config import KVConfig
from common.kv.format import KVLayout
from common.kv.pool import KVPool
from proto import hack_pb2, hack_pb2_grpc

SEED = 1234
FALLBACK_TEXT = "Once upon a time, a little fox lived by the river and watched the boats go by every morning. "


@dataclass
class Timed:
    latencies_s: list[float]
    prefills: int  # Prefill calls the prefill instance served
    kv_bytes: int  # KV bytes it pushed


def prompt_ids(client: httpx.Client, text_path: Path, length: int) -> list[int]:
    """`length` tokens of real text (the server's own tokenizer), repeated when the text is shorter."""
    text = text_path.read_text()[: 20 * length] if text_path.exists() else FALLBACK_TEXT
    ids = client.post("/tokenize", json={"prompt": text}).raise_for_status().json()["tokens"]
    return (ids * (length // len(ids) + 1))[:length]


async def completion(client: httpx.AsyncClient, model: str, prompt: list[int], n: int, seed: int,
                     output_len: int) -> None:
    response = await client.post("/v1/completions", json={
        "model": model, "prompt": prompt, "n": n, "max_tokens": output_len, "temperature": 0.8, "seed": seed,
        "ignore_eos": True})
    body = response.raise_for_status().json()
    produced = body["usage"]["completion_tokens"]
    if produced != n * output_len:
        raise RuntimeError(f"expected {n * output_len} tokens, got {produced}")


async def one_request(client: httpx.AsyncClient, model: str, prompt: list[int], n: int, output_len: int,
                      shared: bool) -> float:
    """Wall time of n choices: one request (shared) or n concurrent one-choice requests."""
    started = time.perf_counter()
    if shared:
        await completion(client, model, prompt, n, SEED, output_len)
    else:
        await asyncio.gather(*(completion(client, model, prompt, 1, SEED + i, output_len) for i in range(n)))
    return time.perf_counter() - started


def prefill_counters(address: str) -> hack_pb2.Counters:
    with grpc.insecure_channel(address) as channel:
        return hack_pb2_grpc.PrefillServiceStub(channel).Stats(hack_pb2.StatsRequest(), timeout=10).counters


def measure(cluster: Cluster, prompt: list[int], n: int, args: argparse.Namespace) -> dict[bool, Timed]:
    """Alternate the two ways `repeats` times (after one warm-up each); counters over the timed runs."""
    address = cluster.by_role("prefill")[0].address
    results = {True: Timed([], 0, 0), False: Timed([], 0, 0)}

    async def run() -> None:
        async with httpx.AsyncClient(base_url=cluster.url, timeout=600) as client:
            for shared in (True, False):
                await one_request(client, cluster.config.served_model_name, prompt, n, args.output_len, shared)
            for _ in range(args.repeats):
                for shared in (True, False):
                    before = prefill_counters(address)
                    results[shared].latencies_s.append(await one_request(
                        client, cluster.config.served_model_name, prompt, n, args.output_len, shared))
                    after = prefill_counters(address)
                    results[shared].prefills += after.requests_total - before.requests_total
                    results[shared].kv_bytes += after.kv_bytes - before.kv_bytes

    asyncio.run(run())
    return results


def format_table(rows: dict[int, dict[bool, Timed]], args: argparse.Namespace, load: tuple[float, float]) -> str:
    base = {shared: statistics.median(rows[min(rows)][shared].latencies_s) for shared in (True, False)}
    lines = [
        f"Model `{Path(args.model).name}`, KV mode `{args.kv_mode}`, 1 prefill + 1 decode instance on one machine "
        f"({platform.machine()}, {os.cpu_count()} CPUs, CPU torch), prompt {args.prompt_len} tokens, "
        f"{args.output_len} output tokens per choice (temperature 0.8, seeded, ignore_eos), median of "
        f"{args.repeats}, the two ways alternating. Command: `python -m bench.choices`.",
        "",
        "| n | one request, shared prefill (ms) | n requests, a prefill each (ms) | shared / separate "
        f"| vs n={min(rows)}: shared / separate | prefills per request: shared / separate "
        "| KV MB pushed: shared / separate |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, timed in rows.items():
        shared, separate = (statistics.median(timed[s].latencies_s) for s in (True, False))
        lines.append(
            f"| {n} | {shared * 1e3:,.0f} | {separate * 1e3:,.0f} | {shared / separate:.2f}x "
            f"| {shared / base[True]:.2f}x / {separate / base[False]:.2f}x "
            f"| {timed[True].prefills / args.repeats:g} / {timed[False].prefills / args.repeats:g} "
            f"| {timed[True].kv_bytes / args.repeats / 1e6:.2f} / {timed[False].kv_bytes / args.repeats / 1e6:.2f} |")
    lines += ["", "Shared: the router sends one Prefill with n, the prefill instance runs the prompt once and "
              "pushes its KV once, the decode instance copies it into each choice's pages. Separate: what `n` did "
              "before (each choice its own request, prefill and push). Router, services and client share the "
              f"machine's CPUs; 1-minute load average {load[0]:.1f} before and {load[1]:.1f} after the run (other "
              "work on the machine included)."]
    return "\n".join(lines)


def fork_costs(prompt_lens: tuple[int, ...] = (256, 2048), ns: tuple[int, ...] = (3, 8),
               repeats: int = 5) -> str:
    """Best-of-`repeats` time of copying one prompt's KV into n - 1 more sequences, SmolLM2-135M's geometry
    (30 layers, 3 KV heads, head_dim 64), default KV options, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return "\n".join(_fork_rows(prompt_lens, ns, repeats))
    finally:
        torch.set_num_threads(threads)


def _fork_rows(prompt_lens: tuple[int, ...], ns: tuple[int, ...], repeats: int) -> list[str]:
    lines = ["| KV mode | prompt tokens | n | fork (ms) | copied MB |", "|---|---|---|---|---|"]
    for mode in ("hack", "fp16"):
        layout = KVLayout(KVConfig(mode=mode), num_kv_heads=3, head_dim=64)
        pages = max(n * layout.blocks_for(max(prompt_lens)) for n in ns)
        pool = KVPool(layout, num_layers=30, num_blocks=pages, max_seqs=max(ns))
        for prompt_len, n in ((p, n) for p in prompt_lens for n in ns):
            times = []
            for _ in range(repeats):
                pool.allocate({0: prompt_len})
                started = time.perf_counter()
                pool.fork(0, list(range(1, n)))
                times.append(time.perf_counter() - started)
                for seq_id in range(n):
                    pool.free(seq_id)
            copied = (n - 1) * 30 * (layout.blocks_for(prompt_len) * layout.block_bytes + layout.state_bytes)
            lines.append(f"| {mode} | {prompt_len} | {n} | {min(times) * 1e3:.1f} | {copied / 1e6:.2f} |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.choices", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory or name (default: $HACK_MODEL, else the embedded model)")
    parser.add_argument("--kv-mode", choices=("fp16", "dequant", "hack"), default="hack")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 3, 8])
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--text", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
                        / "tinystories_val.txt", help="prompt source (a built-in sentence when absent)")
    parser.add_argument("--write", type=Path, help="markdown file to write the table into (docs/benchmarks.md)")
    parser.add_argument("--section", default="n choices (bench/choices.py)", help="its section title")
    parser.add_argument("--fork-costs", action="store_true", help="only time the decode side's KV copy")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.prompt_len < 1 or args.output_len < 1 or min(args.n) < 1:
        parser.error("--repeats, --prompt-len, --output-len and every --n must be >= 1")
    args.model = model_from_env(args.model)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fork_costs:
        print(fork_costs())
        print(f"\n1-minute load average {os.getloadavg()[0]:.1f}")
        return 0
    load_before = os.getloadavg()[0]
    config = ClusterConfig(args.model, kv_mode=args.kv_mode, port=0)
    with Cluster(config) as cluster:
        with httpx.Client(base_url=cluster.url, timeout=60) as client:
            prompt = prompt_ids(client, args.text, args.prompt_len)
        rows = {}
        for n in sorted(args.n):
            rows[n] = measure(cluster, prompt, n, args)
            print(f"n={n}: " + ", ".join(f"{'shared' if s else 'separate'} "
                                         f"{statistics.median(rows[n][s].latencies_s) * 1e3:.0f} ms"
                                         for s in (True, False)), flush=True)
    table = format_table(rows, args, (load_before, os.getloadavg()[0]))
    print(table)
    if args.write:
        write_section(args.write, args.section, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
