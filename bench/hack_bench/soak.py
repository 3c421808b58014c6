"""`hack-bench soak`: hold a steady load for minutes and watch for slow leaks and drift.

    hack-bench soak --minutes 10 --concurrency 32                       # starts its own hack-cluster
    hack-bench soak --base-url http://127.0.0.1:8000 --pid 123 --pid 456 --minutes 10

`--concurrency` clients send streaming requests back to back until the time is up. Every `--window` seconds
the tool records the window's requests, errors and latency percentiles, and the resident memory (RSS) and open
file descriptors of every process it watches (the cluster it started, or the `--pid`s given). At the end it
prints both tables, the start-vs-end change of each process, the decode pools' used KV blocks once idle, and
optionally writes everything as JSON. A benchmark, not a test: it passes no verdict beyond the numbers.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil

from bench.hack_bench.client import EndpointConfig, endpoint_is_chat, first_model_id, send_request
from bench.hack_bench.dataset import DatasetConfig, load_tokenizer, sample_requests
from bench.hack_bench.records import BenchmarkError, RequestOutput, SampleRequest
from common.cluster import Cluster, ClusterConfig
from common.default_model import model_from_env


@dataclass(frozen=True)
class ProcessSample:
    name: str
    pid: int
    rss_mib: float
    open_fds: int


@dataclass
class Window:
    """One `--window` seconds of the run."""

    end_s: float
    requests: int = 0
    errors: int = 0
    p50_latency_s: float = 0.0
    p99_latency_s: float = 0.0
    p99_ttft_s: float = 0.0
    processes: list[ProcessSample] = field(default_factory=list)
    error_kinds: dict[str, int] = field(default_factory=dict)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target (default: start a local hack-cluster)")
    target.add_argument("--base-url", help="soak a running server instead of starting a cluster")
    target.add_argument("--pid", type=int, action="append", default=[],
                        help="with --base-url: a process to watch (repeatable)")
    target.add_argument("--model", help="model directory (cluster) or name sent (default: the cluster's, "
                        "or the first of /v1/models)")
    target.add_argument("--kv-mode", default="hack", help="cluster KV mode")
    target.add_argument("--prefill", type=int, default=1, help="cluster prefill instances")
    target.add_argument("--decode", type=int, default=1, help="cluster decode instances")
    target.add_argument("--decode-arg", action="append", default=[], help="extra decode flag (repeatable)")
    load = parser.add_argument_group("load")
    load.add_argument("--minutes", type=float, required=True, help="how long to hold the load")
    load.add_argument("--concurrency", type=int, default=32, help="streams in flight at all times")
    load.add_argument("--input-len", type=int, default=64, help="prompt tokens (random dataset)")
    load.add_argument("--output-len", type=int, default=64, help="output tokens (ignore_eos)")
    load.add_argument("--endpoint", default="/v1/completions")
    load.add_argument("--window", type=float, default=30.0, help="seconds per row of the time table")
    load.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", type=Path, help="write windows and process samples here")


def run(args: argparse.Namespace) -> int:
    if args.minutes <= 0 or args.concurrency < 1 or args.window <= 0:
        raise BenchmarkError("--minutes and --window must be > 0 and --concurrency >= 1")
    if args.base_url and not args.pid:
        print("note: no --pid given: only request numbers are recorded")
    with _target(args) as (url, model, processes, decode_addresses):
        tokenizer = load_tokenizer(None, model)
        samples = sample_requests(DatasetConfig(num_prompts=256, seed=args.seed, random_input_len=args.input_len,
                                                random_output_len=args.output_len), tokenizer)
        windows, idle_blocks = asyncio.run(_soak(args, url, model, processes, samples, decode_addresses))
    print(format_report(windows, idle_blocks))
    if args.output_json:
        args.output_json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()
                                                             if k != "func"},
                                                "windows": [asdict(w) for w in windows],
                                                "idle_used_kv_blocks": idle_blocks}, indent=2))
    return 0


@contextlib.contextmanager
def _target(args: argparse.Namespace) -> Iterator[tuple[str, str | None, dict[str, int], list[str]]]:
    """(URL, model, {process name: pid}, decode addresses) of what to soak; a started cluster stops after."""
    if args.base_url:
        yield args.base_url.rstrip("/"), args.model, {f"pid-{pid}": pid for pid in args.pid}, []
        return
    model = model_from_env(args.model)
    config = ClusterConfig(model, num_prefill=args.prefill, num_decode=args.decode, kv_mode=args.kv_mode, port=0,
                           decode_args=tuple(args.decode_arg))
    with Cluster(config) as cluster:
        processes = {p.name: p.popen.pid for p in cluster.processes}
        yield cluster.url, model, processes, [p.address for p in cluster.by_role("decode")]


async def _soak(args: argparse.Namespace, url: str, model: str | None, processes: dict[str, int],
                samples: list[SampleRequest], decode_addresses: list[str]) -> tuple[list[Window], list[int]]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0),
                                 limits=httpx.Limits(max_connections=args.concurrency)) as client:
        name = model if model and not Path(model).is_dir() else await first_model_id(client, url)
        endpoint = EndpointConfig(api_url=url + args.endpoint, model=name, chat=endpoint_is_chat(args.endpoint),
                                  ignore_eos=True)
        watched = {label: psutil.Process(pid) for label, pid in processes.items()}
        start = time.perf_counter()
        deadline = start + args.minutes * 60
        finished: list[RequestOutput] = []
        next_sample = itertools.cycle(samples)
        windows = [Window(0.0, processes=_sample_processes(watched))]

        async def client_loop() -> None:
            while time.perf_counter() < deadline:
                finished.append(await send_request(client, endpoint, next(next_sample), start))

        clients = [asyncio.ensure_future(client_loop()) for _ in range(args.concurrency)]
        seen = 0
        while not all(c.done() for c in clients):
            await asyncio.wait(clients, timeout=args.window)
            now = time.perf_counter()
            windows.append(_window(now - start, finished[seen:], watched))
            seen = len(finished)
            print(_format_window(windows[-1]), flush=True)
        await asyncio.gather(*clients)
    return windows, _idle_used_blocks(decode_addresses)


def _window(end_s: float, outputs: list[RequestOutput], watched: dict[str, psutil.Process]) -> Window:
    window = Window(end_s, requests=len(outputs), processes=_sample_processes(watched))
    latencies = [o.latency for o in outputs if o.success]
    ttfts = [o.ttft for o in outputs if o.success]
    for output in outputs:
        if not output.success:
            window.errors += 1
            kind = output.error.split(":")[0][:60]
            window.error_kinds[kind] = window.error_kinds.get(kind, 0) + 1
    if latencies:
        window.p50_latency_s, window.p99_latency_s = (float(v) for v in np.percentile(latencies, [50, 99]))
        window.p99_ttft_s = float(np.percentile(ttfts, 99))
    return window


def _sample_processes(watched: dict[str, psutil.Process]) -> list[ProcessSample]:
    samples = []
    for label, process in watched.items():
        try:
            with process.oneshot():
                samples.append(ProcessSample(label, process.pid, process.memory_info().rss / 2**20,
                                             process.num_fds()))
        except psutil.Error:  # it died: the report shows it missing from that window on
            continue
    return samples


def _idle_used_blocks(decode_addresses: list[str]) -> list[int]:
    """Used KV blocks of each decode instance once the load stopped (leaked blocks show here)."""
    if not decode_addresses:
        return []
    import grpc

    from proto import hack_pb2, hack_pb2_grpc

    time.sleep(1.0)  # let the last frees land
    used = []
    for address in decode_addresses:
        with grpc.insecure_channel(address) as channel:
            stats = hack_pb2_grpc.DecodeServiceStub(channel).Stats(hack_pb2.StatsRequest(), timeout=5)
        used.append(stats.used_kv_blocks)
    return used


def _format_window(window: Window) -> str:
    errors = f" {window.error_kinds}" if window.error_kinds else ""
    return (f"t={window.end_s:7.1f}s requests={window.requests:5d} errors={window.errors:3d} "
            f"p50={window.p50_latency_s:6.3f}s p99={window.p99_latency_s:6.3f}s ttft_p99={window.p99_ttft_s:6.3f}s"
            f"{errors}")


def format_report(windows: list[Window], idle_blocks: list[int]) -> str:
    lines = ["", "== soak: requests per window ==",
             f"{'t (s)':>8} {'requests':>9} {'errors':>7} {'p50 (s)':>8} {'p99 (s)':>8} {'TTFT p99 (s)':>13}"]
    for w in windows[1:]:
        lines.append(f"{w.end_s:8.1f} {w.requests:9d} {w.errors:7d} {w.p50_latency_s:8.3f} {w.p99_latency_s:8.3f} "
                     f"{w.p99_ttft_s:13.3f}")
    total = sum(w.requests for w in windows)
    errors = sum(w.errors for w in windows)
    lines.append(f"total: {total} requests, {errors} errors")
    # Memory grows while the first requests warm caches and allocators: the change is measured from the end of
    # the first window (with load), the idle start is shown beside it.
    idle = {p.name: p for p in windows[0].processes}
    warm = {p.name: p for p in windows[min(1, len(windows) - 1)].processes}
    last = {p.name: p for p in windows[-1].processes}
    if idle:
        lines += ["", "== soak: processes (RSS MiB, open fds): idle start, after the first window, end ==",
                  f"{'process':>12} {'pid':>8} {'RSS idle':>9} {'RSS warm':>9} {'RSS end':>9} {'change':>8} "
                  f"{'fds idle':>9} {'fds warm':>9} {'fds end':>8}"]
        for name, start in idle.items():
            if name not in last or name not in warm:
                lines.append(f"{name:>12} {start.pid:8d} {start.rss_mib:9.1f} (exited)")
                continue
            w, end = warm[name], last[name]
            change = (end.rss_mib - w.rss_mib) / w.rss_mib * 100
            lines.append(f"{name:>12} {start.pid:8d} {start.rss_mib:9.1f} {w.rss_mib:9.1f} {end.rss_mib:9.1f} "
                         f"{change:+7.1f}% {start.open_fds:9d} {w.open_fds:9d} {end.open_fds:8d}")
    if idle_blocks:
        lines.append(f"decode pools once idle: used KV blocks {idle_blocks}")
    return "\n".join(lines)
