"""`scripts/netns-cluster.sh`: serve across real, shaped network links and check them against one machine.

    scripts/netns-cluster.sh [--gbps 1 10] [--delay-ms 0] [--kv-mode fp16] [--model DIR] [--json PATH]

1. Starts the single-host cluster (common/cluster.py, loopback) and records the greedy completions of a few
   prompts (random token ids, sent one at a time).
2. For each link rate, starts the namespace cluster (common/netns.py: router, prefill and decode each in its own
   network namespace, the prefill -> decode link shaped by tc) and sends the same prompts.
3. Checks that every completion equals the single-host one, and that the KV transfer time the prefill measured
   (PushKV opened -> decode acknowledged; from the router's /metrics) is within --tolerance of
   KV bytes / link rate for the links up to --rate-check-max-gbps. Faster links are reported, not checked: one
   Python process on a small machine cannot fill them (an unshaped veth carried 2-4 Gbit/s on 2 cores). The
   push streams each layer as the forward computes it, so the rate is checked only where the forward took
   under 80% of bytes / rate; on a CPU too loaded for that, the row says "inconclusive" and why.

The default model is a random-weight checkpoint with a large KV cache for little compute (64 layers of 32 KV
heads x 128 dims, hidden size 32: 1 MiB of fp16 KV per token, 32 MiB for the 32-token prompts), so that the
link, not the forward, sets the transfer time where the forward is fast enough: the table shows both. Exit status 0 when every check passed, 1 when one failed, 2 on a usage error, 77 (with the
reason) where network namespaces cannot be used.
"""

import argparse
import asyncio
import json
import random
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from bench.hack_bench.breakdown import (KV_BYTES, KV_TRANSFER, PREFILL_COMPUTE, PREFIX, histogram_mean, observations,
                                        parse_metrics, snapshot_delta)
from common.cluster import Cluster, ClusterConfig, ClusterStartError
from common.kv.config import MODES
from common.netns import LinkShape, NetnsCluster, netem_available, unavailable_reason

SKIPPED = 77  # the exit status automake and others use for "this test cannot run here"
QUIET = "--log-level=warning"
LINK_MODEL, LINK_MODEL_LAYERS = "kv-heavy", 64
LINK_BOUND_FRACTION = 0.8  # the forward must take less than this fraction of bytes / rate for a rate check


@dataclass(frozen=True)
class LinkResult:
    link: str
    gbps: float
    requests: int
    kv_bytes_per_request: float
    transfer_s: float  # mean measured PushKV time
    compute_s: float  # mean prefill forward time (the push streams each layer as it is computed)
    expected_s: float  # KV bytes / link rate
    identical: bool  # every completion equals the single-host one
    rate_checked: bool

    @property
    def ratio(self) -> float:
        return self.transfer_s / self.expected_s if self.expected_s else float("inf")

    @property
    def link_bound(self) -> bool:
        """The forward left the link the bottleneck. The push streams each layer as it is computed, so the
        transfer can never take less than the forward: when the forward is slower (a loaded CPU), the transfer
        time measures the CPU, not the link, and the rate cannot be checked."""
        return self.compute_s < LINK_BOUND_FRACTION * self.expected_s

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
    parser.add_argument("--dtype", default="bfloat16", help="model compute dtype of the instances (bf16: the "
                        "fastest forward on CPUs with AVX512-BF16, so the link sets the transfer time)")
    parser.add_argument("--gbps", nargs="+", type=float, default=[1.0, 10.0], help="link rates to test")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="added one-way latency (needs netem)")
    parser.add_argument("--num-prompts", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--tolerance", type=float, default=0.2, help="allowed relative error of the transfer time")
    parser.add_argument("--rate-check-max-gbps", type=float, default=1.0,
                        help="check the transfer time only on links up to this rate (faster ones are reported)")
    parser.add_argument("--prefix", help="namespace name prefix (default hk<pid>)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--start-timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    for name in ("num_prompts", "prompt_len", "max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.tolerance < 1:
        parser.error("--tolerance must be in (0, 1)")
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
                                         "--max-batch-seqs", "1"),
                           decode_args=(QUIET, "--dtype", args.dtype, "--kv-memory-mb", "256", "--max-seqs", "4"),
                           router_args=(QUIET,))
    try:
        print("single host (loopback): serving the prompts", flush=True)
        reference, _ = serve(Cluster(config), prompts, args.max_tokens)
        results = []
        for gbps in args.gbps:
            shape = LinkShape(gbps, args.delay_ms)
            print(f"namespaces, prefill -> decode link {shape.describe()}: serving the prompts", flush=True)
            texts, delta = serve(NetnsCluster(config, shape, args.prefix), prompts, args.max_tokens)
            results.append(link_result(shape, delta, texts == reference, gbps <= args.rate_check_max_gbps))
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


def serve(cluster: Cluster, prompts: list[list[int]], max_tokens: int) -> tuple[list[str], dict[str, float]]:
    """Start the cluster, send a warm-up request then every prompt one at a time, stop it. Returns the
    completions and the router's metrics delta over the prompts."""
    with cluster:
        return asyncio.run(_send(cluster.url, cluster.config.served_model_name, prompts, max_tokens))


async def _send(url: str, model: str, prompts: list[list[int]],
                max_tokens: int) -> tuple[list[str], dict[str, float]]:
    async with httpx.AsyncClient(base_url=url, timeout=120.0) as client:
        async def complete(prompt: list[int]) -> str:
            response = await client.post("/v1/completions", json={
                "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True})
            if response.status_code != 200:
                raise RuntimeError(f"completion failed with HTTP {response.status_code}: {response.text}")
            return response.json()["choices"][0]["text"]

        await complete(prompts[0])  # warm-up: connections, first-call allocations
        before = parse_metrics((await client.get("/metrics")).text)
        texts = [await complete(prompt) for prompt in prompts]
        await asyncio.sleep(0.5)  # the last PrefillResponse may reach the router just after the last token
        after = parse_metrics((await client.get("/metrics")).text)
    return texts, snapshot_delta(before, after)


def link_result(shape: LinkShape, delta: dict[str, float], identical: bool, rate_checked: bool) -> LinkResult:
    requests = observations(delta, KV_TRANSFER)
    if requests == 0:
        raise RuntimeError("the router's metrics counted no KV transfer")
    kv_bytes = delta.get(f"{PREFIX}{KV_BYTES}", 0.0) / requests
    expected_s = kv_bytes * 8 / (shape.gbps * 1e9)
    return LinkResult(shape.describe(), shape.gbps, requests, kv_bytes, histogram_mean(delta, KV_TRANSFER),
                      histogram_mean(delta, PREFILL_COMPUTE), expected_s, identical, rate_checked)


def format_table(results: list[LinkResult], tolerance: float) -> str:
    lines = ["| prefill -> decode link | requests | KV MB/request | transfer ms (measured) | bytes / rate ms | "
             "ratio | prefill forward ms | rate check | greedy output = single host |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in results:
        check = r.rate_verdict(tolerance)
        lines.append(f"| {r.link} | {r.requests} | {r.kv_bytes_per_request / 1e6:.2f} | {r.transfer_s * 1e3:.1f} | "
                     f"{r.expected_s * 1e3:.1f} | {r.ratio:.2f} | {r.compute_s * 1e3:.1f} | {check} | {'yes' if r.identical else 'NO'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
