"""`scripts/netns-cluster.sh`: serve across real, shaped network links and check them against one machine.

    scripts/netns-cluster.sh [--gbps 1 10] [--delay-ms 0] [--kv-mode fp16] [--model DIR] [--json PATH]

1. Starts the single-host cluster (common/cluster.py, loopback) and records the greedy completions of a few
   prompts (random token ids, sent one at a time).
2. For each link rate, starts the namespace cluster (common/netns.py: router, prefill and decode each in its own
   network namespace, the prefill -> decode link shaped by tc) and sends the same prompts.
3. Checks that every completion equals the single-host one, and that the KV transfer time is within --tolerance
   of KV bytes / link rate for the links up to --rate-check-max-gbps. Faster links are reported, not checked: the
   KV push (a Python gRPC sender and receiver) carried 0.5-2.5 Gbit/s on 2 loaded cores, even unshaped.

What is timed. The prefill instances run with --kv-push after-forward (the default of --kv-push here): each
request's KV waits until its forward is done, then crosses the link back to back, so the push time past the
forward (the prefill's PushKV time - its forward time, both from the router's /metrics, scraped around each
request) is the time the link took for every byte, from the forward's end to the decode instance's
acknowledgement. With --kv-push layerwise (the serving default) the push streams each layer as it is computed,
so a forward slower than the link (a small or loaded CPU) sets the transfer time: the rate is then checked only
where the forward took under 80% of bytes / rate, and the row says "inconclusive" otherwise. Each row gives the
median over its requests (a neighbour's burst of CPU load slows one request, not the median).

The default model is a random-weight checkpoint with a large KV cache for little compute (64 layers of 32 KV
heads x 128 dims, hidden size 32: 1 MiB of fp16 KV per token, 32 MiB for the 32-token prompts: 268 ms at
1 Gbit/s). Exit status 0 when every check passed, 1 when one failed, 2 on a usage error, 77 (with the reason)
where network namespaces cannot be used.
"""

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from bench.hack_bench.breakdown import (KV_BYTES, KV_TRANSFER, PREFILL_COMPUTE, PREFIX, histogram_mean, observations,
                                        parse_metrics, snapshot_delta)
from common.cluster import Cluster, ClusterConfig, ClusterStartError
from common.kv.config import MODES
from common.netns import LinkShape, NetnsCluster, netem_available, unavailable_reason
from prefill_service.kv_sender import KV_PUSH_MODES

SKIPPED = 77  # the exit status automake and others use for "this test cannot run here"
QUIET = "--log-level=warning"
LINK_MODEL, LINK_MODEL_LAYERS = "kv-heavy", 64
LINK_BOUND_FRACTION = 0.8  # layerwise: the forward must take less than this fraction of bytes / rate


@dataclass(frozen=True)
class RequestTiming:
    """One request's stages, as the prefill instance measured them (router /metrics deltas)."""
    kv_bytes: float
    push_s: float  # PushKV opened (when the forward starts) -> decode instance acknowledged
    compute_s: float  # the prefill forward

    @property
    def past_forward_s(self) -> float:
        return self.push_s - self.compute_s


@dataclass(frozen=True)
class LinkResult:
    link: str
    gbps: float
    kv_push: str
    requests: int
    kv_bytes_per_request: float
    push_s: float  # median PushKV time
    compute_s: float  # median prefill forward time
    transfer_s: float  # median time the link took: push past the forward (after-forward), the push (layerwise)
    expected_s: float  # KV bytes / link rate
    identical: bool  # every completion equals the single-host one
    rate_checked: bool
    load_average: tuple[float, float, float]  # at the end of the row (1, 5, 15 min)
    per_request: tuple[RequestTiming, ...]

    @property
    def ratio(self) -> float:
        return self.transfer_s / self.expected_s if self.expected_s else float("inf")

    @property
    def link_bound(self) -> bool:
        """The link, not the CPU, set the measured time. After the forward it does by construction (nothing
        else runs); a layer-wise push can never end before the forward, so there the forward must be faster."""
        return self.kv_push == "after-forward" or self.compute_s < LINK_BOUND_FRACTION * self.expected_s

    def rate_verdict(self, tolerance: float) -> str:
        if not self.rate_checked:
            return "reported only"
        if not self.link_bound:
            return f"inconclusive: the forward outlasts {LINK_BOUND_FRACTION:.0%} of bytes / rate"
        return ("pass" if abs(self.ratio - 1) <= tolerance else "FAIL") + f" (±{tolerance:.0%})"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="netns-cluster.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help=f"checkpoint directory (default: the random {LINK_MODEL} model)")
    parser.add_argument("--kv-mode", choices=MODES, default="fp16")
    parser.add_argument("--kv-push", choices=KV_PUSH_MODES, default="after-forward",
                        help="the prefill instances' --kv-push (after-forward: the time past the forward is the "
                             "link's; layerwise: the serving default, bounded by the forward)")
    parser.add_argument("--dtype", default="bfloat16", help="model compute dtype of the instances (bf16: the "
                        "fastest forward on CPUs with AVX512-BF16, so the link sets the transfer time)")
    parser.add_argument("--gbps", nargs="+", type=float, default=[1.0, 10.0], help="link rates to test")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="added one-way latency (needs netem)")
    parser.add_argument("--num-prompts", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--tolerance", type=float, default=0.2, help="allowed relative error of the transfer time")
    parser.add_argument("--rate-check-max-gbps", type=float, default=1.0,
                        help="check the transfer time only on links up to this rate (faster ones are reported)")
    parser.add_argument("--nice", type=int, default=-10, help="scheduling priority of the namespace cluster's "
                        "processes (default -10: on a shared machine, the neighbours' CPU load would otherwise add "
                        "to the time the link takes; 0 = as this process)")
    parser.add_argument("--prefix", help="namespace name prefix (default hk<pid>)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--start-timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    for name in ("num_prompts", "prompt_len", "max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.tolerance < 1:
        parser.error("--tolerance must be in (0, 1)")
    if not -20 <= args.nice <= 19:
        parser.error("--nice must be in -20..19")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # stop the clusters and remove the namespaces, as Ctrl-C does
    reason = unavailable_reason()
    if reason is None and args.delay_ms and not netem_available():
        reason = "--delay-ms needs the netem qdisc, which this kernel lacks"
    if reason is not None:
        print(f"netns-cluster: skipped: {reason}", flush=True)
        return SKIPPED
    model = args.model or str(_link_model())
    prompts = random_prompts(model, args.num_prompts, args.prompt_len)
    config = ClusterConfig(model, kv_mode=args.kv_mode, port=0, start_timeout_s=args.start_timeout,
                           prefill_args=(QUIET, "--dtype", args.dtype, "--token-budget", str(args.prompt_len),
                                         "--max-batch-seqs", "1", "--kv-push", args.kv_push),
                           decode_args=(QUIET, "--dtype", args.dtype, "--kv-memory-mb", "256", "--max-seqs", "4"),
                           router_args=(QUIET,))
    try:
        print("single host (loopback): serving the prompts", flush=True)
        reference, _ = serve(Cluster(config), prompts, args.max_tokens)
        results = []
        for gbps in args.gbps:
            shape = LinkShape(gbps, args.delay_ms)
            print(f"namespaces, prefill -> decode link {shape.describe()}: serving the prompts", flush=True)
            texts, timings = serve(NetnsCluster(config, shape, args.prefix, args.nice), prompts, args.max_tokens)
            results.append(link_result(shape, args.kv_push, timings, texts == reference,
                                       gbps <= args.rate_check_max_gbps))
    except (ClusterStartError, httpx.HTTPError, RuntimeError) as error:
        print(f"netns-cluster: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the clusters stopped and the namespaces are gone (context managers)
        print("netns-cluster: interrupted", file=sys.stderr)
        return 130
    print(format_table(results, args.tolerance))
    if args.json:
        verdicts = [asdict(r) | {"ratio": r.ratio, "link_bound": r.link_bound, "verdict": r.rate_verdict(args.tolerance)}
                    for r in results]
        args.json.write_text(json.dumps(verdicts, indent=2) + "\n")
    failed = [r for r in results if not r.identical or r.rate_verdict(args.tolerance).startswith("FAIL")]
    inconclusive = [r.link for r in results if r.rate_verdict(args.tolerance).startswith("inconclusive")]
    if failed:
        print("FAILED: " + ", ".join(r.link for r in failed))
    elif inconclusive:
        print("OK, but the rate of " + ", ".join(inconclusive) + " could not be checked: the CPU was too slow or "
              "too loaded to fill the link (see the prefill forward column)")
    else:
        print("OK: every check passed")
    return 1 if failed else 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _link_model() -> Path:
    from bench.hack_bench.experiment import ensure_random_model

    return ensure_random_model(LINK_MODEL, LINK_MODEL_LAYERS)


def random_prompts(model: str, count: int, length: int) -> list[list[int]]:
    """Token ids drawn with a fixed seed from the model's vocabulary (past the special tokens)."""
    vocab_size = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    return [[rng.randrange(3, vocab_size) for _ in range(length)] for _ in range(count)]


def serve(cluster: Cluster, prompts: list[list[int]], max_tokens: int) -> tuple[list[str], list[RequestTiming]]:
    """Start the cluster, send a warm-up request then every prompt one at a time, stop it. Returns the
    completions and each prompt's timings."""
    with cluster:
        return asyncio.run(_send(cluster.url, cluster.config.served_model_name, prompts, max_tokens))


async def _send(url: str, model: str, prompts: list[list[int]],
                max_tokens: int) -> tuple[list[str], list[RequestTiming]]:
    async with httpx.AsyncClient(base_url=url, timeout=120.0) as client:
        async def complete(prompt: list[int]) -> str:
            response = await client.post("/v1/completions", json={
                "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True})
            if response.status_code != 200:
                raise RuntimeError(f"completion failed with HTTP {response.status_code}: {response.text}")
            return response.json()["choices"][0]["text"]

        async def scrape(transfers: int) -> dict[str, float]:
            """/metrics once it counts `transfers` KV transfers: the PrefillResponse that reports one may reach
            the router just after the completion's last token."""
            for _ in range(100):
                metrics = parse_metrics((await client.get("/metrics")).text)
                if metrics.get(f"{PREFIX}{KV_TRANSFER}_count", 0.0) >= transfers:
                    return metrics
                await asyncio.sleep(0.1)
            raise RuntimeError(f"the router's metrics did not count {transfers} KV transfers within 10 s")

        await complete(prompts[0])  # warm-up: connections, first-call allocations
        texts, timings, before = [], [], await scrape(1)
        for prompt in prompts:
            texts.append(await complete(prompt))
            after = await scrape(round(before[f"{PREFIX}{KV_TRANSFER}_count"]) + 1)
            timings.append(request_timing(snapshot_delta(before, after)))
            before = after
    return texts, timings


def request_timing(delta: dict[str, float]) -> RequestTiming:
    """The one request a metrics delta holds."""
    if observations(delta, KV_TRANSFER) != 1:
        raise RuntimeError(f"the router's metrics counted {observations(delta, KV_TRANSFER)} KV transfers for one "
                           "request")
    return RequestTiming(delta.get(f"{PREFIX}{KV_BYTES}", 0.0), histogram_mean(delta, KV_TRANSFER),
                         histogram_mean(delta, PREFILL_COMPUTE))


def link_result(shape: LinkShape, kv_push: str, timings: list[RequestTiming], identical: bool,
                rate_checked: bool) -> LinkResult:
    kv_bytes = statistics.median(t.kv_bytes for t in timings)
    transfer = [t.past_forward_s if kv_push == "after-forward" else t.push_s for t in timings]
    return LinkResult(shape.describe(), shape.gbps, kv_push, len(timings), kv_bytes,
                      statistics.median(t.push_s for t in timings), statistics.median(t.compute_s for t in timings),
                      statistics.median(transfer), kv_bytes * 8 / (shape.gbps * 1e9), identical, rate_checked,
                      os.getloadavg(), tuple(timings))


def format_table(results: list[LinkResult], tolerance: float) -> str:
    lines = ["| prefill -> decode link | KV push | requests | KV MB/request | prefill forward ms | PushKV ms | "
             "transfer ms (measured) | bytes / rate ms | ratio | rate check | greedy output = single host | load |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in results:
        lines.append(f"| {r.link} | {r.kv_push} | {r.requests} | {r.kv_bytes_per_request / 1e6:.2f} | "
                     f"{r.compute_s * 1e3:.1f} | {r.push_s * 1e3:.1f} | {r.transfer_s * 1e3:.1f} | "
                     f"{r.expected_s * 1e3:.1f} | {r.ratio:.2f} | {r.rate_verdict(tolerance)} | "
                     f"{'yes' if r.identical else 'NO'} | {r.load_average[0]:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
