"""End-to-end tokens/s of a local cluster, and what the router adds per streamed token.

    .venv/bin/python -m bench.cluster --model ../shared/models/stories260K [--concurrency 1 8 32] [--write docs/benchmarks.md]

Starts `hack-cluster` (1 prefill, 1 decode), then at each concurrency runs the same requests twice, alternating:
through the router (HTTP, SSE; hack-bench's client and metrics) and straight to the services over gRPC (what the
router itself does: Generate, Prefill, read the token stream), so the difference in time to first token and in
inter-token latency is the router's share: tokenizing, detokenizing, SSE framing, and one more hop.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import time
from pathlib import Path

import grpc
from transformers import AutoTokenizer

from bench.hack_bench.client import EndpointConfig
from bench.hack_bench.metrics import BenchmarkMetrics, calculate_metrics
from bench.hack_bench.records import RequestOutput, SampleRequest
from bench.hack_bench.runner import LoadConfig, make_http_client, run_benchmark
from bench.report import write_section
from common.cluster import Cluster, ClusterConfig
from common.default_model import model_from_env
from proto import hack_pb2, hack_pb2_grpc

_request_ids = itertools.count()


def make_samples(tokenizer, text_path: Path, count: int, output_len: int) -> list[SampleRequest]:
    """Prompts cut from the first lines of a text file (one story opening each), cycled to `count`."""
    lines = [line.strip() for line in text_path.read_text().splitlines() if len(line.strip()) > 40]
    prompts = [line[:200] for line in lines[: min(count, 64)]]
    return [SampleRequest(p, len(tokenizer(p).input_ids), output_len) for p in itertools.islice(
        itertools.cycle(prompts), count)]


async def grpc_request(prefill, decode, decode_address: str, token_ids: list[int], output_len: int,
                       origin: float) -> RequestOutput:
    """One request run the way the router runs it, timed like hack-bench times an HTTP stream."""
    output = RequestOutput(prompt_len=len(token_ids))
    started = time.perf_counter()
    output.start_time = started - origin
    request_id = f"bench-{next(_request_ids)}"
    call = decode.Generate(hack_pb2.GenerateRequest(request_id=request_id, prompt_len=len(token_ids),
                                                    max_tokens=output_len))
    await call.read()  # admitted
    prefill_call = asyncio.ensure_future(prefill.Prefill(hack_pb2.PrefillRequest(
        request_id=request_id, token_ids=token_ids, decode_address=decode_address)))
    last, count = started, 0
    while await call.read() is not grpc.aio.EOF:
        now = time.perf_counter()
        if count:
            output.itl.append(now - last)
        else:
            output.ttft = now - started
        last, count = now, count + 1
    await prefill_call
    output.success, output.latency, output.output_tokens = True, last - started, count
    return output


async def run_grpc(cluster: Cluster, tokenizer, samples: list[SampleRequest], concurrency: int) -> BenchmarkMetrics:
    prefill_address = cluster.by_role("prefill")[0].address
    decode_address = cluster.by_role("decode")[0].address
    limit = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(prefill_address) as p, grpc.aio.insecure_channel(decode_address) as d:
        prefill, decode = hack_pb2_grpc.PrefillServiceStub(p), hack_pb2_grpc.DecodeServiceStub(d)

        async def one(sample: SampleRequest) -> RequestOutput:
            async with limit:
                return await grpc_request(prefill, decode, decode_address, tokenizer(sample.prompt).input_ids,
                                          sample.expected_output_len, origin)

        origin = time.perf_counter()
        outputs = await asyncio.gather(*(one(s) for s in samples))
        return calculate_metrics(outputs, time.perf_counter() - origin)


async def run_http(cluster: Cluster, samples: list[SampleRequest], concurrency: int) -> BenchmarkMetrics:
    endpoint = EndpointConfig(f"{cluster.url}/v1/completions", cluster.config.served_model_name,
                              ignore_eos=True)
    load = LoadConfig(max_concurrency=concurrency, disable_tqdm=True)
    async with make_http_client(load) as client:
        run = await run_benchmark(client, endpoint, samples, load)
    return calculate_metrics(run.outputs, run.duration_s)


def measure(cluster: Cluster, tokenizer, samples: list[SampleRequest], concurrency: int,
            repeats: int) -> dict[str, float]:
    """Best-of-`repeats` throughput and mean latencies, HTTP and gRPC runs alternating."""
    http, direct = [], []
    for _ in range(repeats):
        http.append(asyncio.run(run_http(cluster, samples, concurrency)))
        direct.append(asyncio.run(run_grpc(cluster, tokenizer, samples, concurrency)))
    for metrics in (*http, *direct):
        if metrics.failed:
            raise RuntimeError(f"{metrics.failed} requests failed: {metrics.errors}")
    best_http = max(http, key=lambda m: m.output_throughput)
    best_direct = max(direct, key=lambda m: m.output_throughput)
    return {
        "http_tok_s": best_http.output_throughput,
        "grpc_tok_s": best_direct.output_throughput,
        "http_ttft_ms": best_http.latencies["ttft"].mean,
        "grpc_ttft_ms": best_direct.latencies["ttft"].mean,
        "http_itl_ms": best_http.latencies["itl"].mean,
        "grpc_itl_ms": best_direct.latencies["itl"].mean,
    }


def format_table(rows: dict[int, dict[str, float]], args: argparse.Namespace, num_requests: dict[int, int]) -> str:
    lines = [
        f"Model `{Path(args.model).name}`, KV mode `{args.kv_mode}`, 1 prefill + 1 decode instance on one machine "
        f"({platform.machine()}, {os.cpu_count()} CPUs, CPU torch), {args.output_len} output tokens per request "
        f"(ignore_eos), best of {args.repeats}. Command: `python -m bench.cluster`.",
        "",
        "| concurrent streams | requests | tokens/s via router | tokens/s direct gRPC | TTFT router / direct (ms) "
        "| ITL router / direct (ms) | router added per token (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for concurrency, r in rows.items():
        lines.append(
            f"| {concurrency} | {num_requests[concurrency]} | {r['http_tok_s']:,.0f} | {r['grpc_tok_s']:,.0f} "
            f"| {r['http_ttft_ms']:.1f} / {r['grpc_ttft_ms']:.1f} | {r['http_itl_ms']:.2f} / {r['grpc_itl_ms']:.2f} "
            f"| {r['http_itl_ms'] - r['grpc_itl_ms']:+.2f} |")
    lines += ["", "Router added per token = mean inter-token latency through the router minus the same straight "
              "from the decode instance; the TTFT columns show the router's share of the first token. The router, "
              "both services and the load generator share the machine's CPUs (1-minute load average "
              f"{os.getloadavg()[0]:.1f} at the end of the run), so on a small machine the router's CPU time also "
              "slows the decode step itself, and differences of a few ms are within the run-to-run noise."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: $HACK_MODEL, else the embedded model)")
    parser.add_argument("--kv-mode", choices=("fp16", "dequant", "hack"), default="hack")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--requests-per-stream", type=int, default=4, help="requests = this x concurrency (min 8)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--text", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
                        / "tinystories_val.txt", help="prompt source, one story per line")
    parser.add_argument("--write", type=Path, help="markdown file to write the table into (docs/benchmarks.md)")
    args = parser.parse_args(argv)
    args.model = model_from_env(args.model)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    config = ClusterConfig(args.model, kv_mode=args.kv_mode, port=0, decode_args=("--kv-memory-mb", "64"))
    rows, num_requests = {}, {}
    with Cluster(config) as cluster:
        for concurrency in args.concurrency:
            num_requests[concurrency] = max(8, args.requests_per_stream * concurrency)
            samples = make_samples(tokenizer, args.text, num_requests[concurrency], args.output_len)
            rows[concurrency] = measure(cluster, tokenizer, samples, concurrency, args.repeats)
            print(f"concurrency {concurrency}: {rows[concurrency]}", flush=True)
    table = format_table(rows, args, num_requests)
    print(table)
    if args.write:
        write_section(args.write, "Cluster end to end (bench/cluster.py)", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
