"""`hack-bench experiment`: the paper's JCT comparison (fp16 vs dequant vs hack KV, several link speeds) in
one command.

    hack-bench experiment --model ../shared/models/stories260K --dataset-path ../shared/data/tinystories_val.txt \\
        [--kv-modes fp16 dequant hack] [--link-gbps 1 10 25] [--num-prompts 16] [--input-len 448 --output-len 64] \\
        [--result-dir docs/experiments]

For every link bandwidth and KV mode it starts a local cluster (one prefill and one decode instance) whose KV
link runs at that bandwidth, replays the same trace (the `long` dataset: windows of
exactly --input-len tokens cut from the text file, sent as token ids, greedy, ignore_eos, fixed seed) and stops
the cluster again, also on error or Ctrl-C. The router's /metrics is scraped right before and after the timed
requests, so the services' own timers give the breakdown of just those requests (breakdown.py). fp16 runs first
at each bandwidth; its outputs are the reference the other modes' outputs are compared with.

How the link is emulated (--network): `netns` puts router, prefill and decode in their own network namespaces
joined by veth pairs, the prefill -> decode pair shaped by tc (common/netns.py: a real TCP connection at the
link rate, plus --link-delay-ms of latency where the kernel has netem); `bucket` runs them on loopback with the
prefill's KV stream paced by a token bucket (common/cluster.py, --kv-link-gbps); `auto` (the default) is netns
where this process may create namespaces (root, ip, tc), else bucket.

Writes {label}.json (settings, machine, rows with generated texts), {label}.md (the table) and {label}.png.
`--random-model llama3-8b --random-model-layers N` benchmarks Llama-3-8B's attention shapes (32 q heads, 8 KV
heads, head_dim 128) with N layers of random weights, for long prompts on a GPU.
"""

import argparse
import asyncio
import json
import logging
import math
import os
import platform
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import torch
from transformers import PreTrainedTokenizerBase

from bench.hack_bench.breakdown import MetricSnapshot, is_settled, jct_breakdown, parse_metrics, snapshot_delta
from bench.hack_bench.client import EndpointConfig
from bench.hack_bench.dataset import DatasetConfig, encode, load_tokenizer, sample_requests
from bench.hack_bench.experiment_report import (Agreement, ExperimentRow, build_row, format_markdown,
                                                output_agreement, plot_experiment)
from bench.hack_bench.metrics import calculate_metrics
from bench.hack_bench.records import BenchmarkError, RequestOutput, SampleRequest
from bench.hack_bench.runner import LoadConfig, make_http_client, probe, send_all
from bench.hack_bench.serve import fill_output_tokens
from common.cluster import Cluster, ClusterConfig, ClusterStartError
from common.netns import LinkShape, NetnsCluster, unavailable_reason
from common.default_model import cache_dir
from common.kv.config import MODES
from common.random_models import RandomModelSpec, write_random_checkpoint

log = logging.getLogger(__name__)

# Attention shapes of real models, for random-weight checkpoints (a byte tokenizer, so the vocabulary is tiny).
RANDOM_MODEL_SHAPES = {
    "llama3-8b": RandomModelSpec(hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8,
                                 head_dim=128, max_position_embeddings=40960, rope_theta=500000.0),
    # A large KV cache for little compute (16 KiB of fp16 KV per token and layer, hidden size 32): on short
    # prompts the link, not the forward, sets the KV transfer time, even on a CPU.
    "kv-heavy": RandomModelSpec(hidden_size=32, intermediate_size=64, num_heads=32, num_kv_heads=32,
                                head_dim=128, max_position_embeddings=128),
}
QUIET = "--log-level=warning"  # the services log every request at INFO
METRICS_SETTLE_S = 10.0  # how long to wait for the last requests' timers to reach the router
PROBE_TOKENS, PROBE_OUTPUT_TOKENS = 32, 4  # the probe request (probe_sample)
NETWORKS = ("auto", "netns", "bucket")


@dataclass(frozen=True)
class ExperimentConfig:
    """What to run; validated on construction."""

    model: str
    dataset_path: Path
    kv_modes: tuple[str, ...] = ("fp16", "dequant", "hack")
    link_gbps: tuple[float, ...] = (1.0, 10.0, 25.0)
    num_prompts: int = 16
    input_len: int = 448
    output_len: int = 64
    request_rate: float = math.inf
    max_concurrency: int | None = 4
    seed: int = 0
    profile_attention: bool = True
    prefill_args: tuple[str, ...] = ()
    decode_args: tuple[str, ...] = ()
    start_timeout_s: float = 300.0
    network: str = "bucket"  # "netns" (tc-shaped links between namespaces) or "bucket" (token bucket, loopback)
    link_delay_ms: float = 0.0  # netns only: added one-way latency of the KV link

    def __post_init__(self) -> None:
        unknown = [mode for mode in self.kv_modes if mode not in MODES]
        if unknown or not self.kv_modes or len(set(self.kv_modes)) != len(self.kv_modes):
            raise BenchmarkError(f"--kv-modes takes distinct modes from {MODES}, got {list(self.kv_modes)}")
        if not self.link_gbps or not all(0 < gbps < math.inf for gbps in self.link_gbps):
            raise BenchmarkError(f"--link-gbps takes positive bandwidths, got {list(self.link_gbps)}")
        for flag, value in (("num-prompts", self.num_prompts), ("input-len", self.input_len),
                            ("output-len", self.output_len)):
            if value < 1:
                raise BenchmarkError(f"--{flag} must be >= 1, got {value}")
        if self.start_timeout_s <= 0:
            raise BenchmarkError(f"--start-timeout must be > 0, got {self.start_timeout_s}")
        if self.network not in ("netns", "bucket"):
            raise BenchmarkError(f"network must be netns or bucket, got {self.network!r}")
        if self.link_delay_ms < 0 or (self.link_delay_ms and self.network != "netns"):
            raise BenchmarkError(f"--link-delay-ms must be >= 0 and needs --network netns, got {self.link_delay_ms}")
        # The prompt file and the load settings are checked where they are built.
        self.dataset()
        self.load()

    def ordered_modes(self) -> list[str]:
        """fp16 first: its outputs are the reference of the modes after it."""
        return sorted(self.kv_modes, key=lambda mode: mode != "fp16")

    def dataset(self) -> DatasetConfig:
        return DatasetConfig(name="long", path=self.dataset_path, num_prompts=self.num_prompts, seed=self.seed,
                             long_input_len=self.input_len, long_output_len=self.output_len)

    def load(self) -> LoadConfig:
        return LoadConfig(request_rate=self.request_rate, max_concurrency=self.max_concurrency, seed=self.seed,
                          disable_tqdm=True)

    def cluster(self, kv_mode: str, link_gbps: float) -> ClusterConfig:
        profile = ("--profile-attention",) if self.profile_attention else ()
        pacing = (f"--kv-link-gbps={link_gbps:g}",) if self.network == "bucket" else ()  # netns: tc shapes it
        return ClusterConfig(self.model, kv_mode=kv_mode, port=0, start_timeout_s=self.start_timeout_s,
                             prefill_args=(QUIET, *pacing, *self.prefill_args),
                             decode_args=(QUIET, *profile, *self.decode_args), router_args=(QUIET,))


# ------------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    which = model.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="checkpoint directory served by the cluster (its tokenizer cuts the prompts)")
    which.add_argument("--random-model", choices=sorted(RANDOM_MODEL_SHAPES),
                       help="a random-weight checkpoint with this model's attention shapes (written once to the "
                            "hack-serve cache directory)")
    model.add_argument("--random-model-layers", type=int, default=4, help="layers of --random-model (default 4)")
    runs = parser.add_argument_group("configurations")
    runs.add_argument("--kv-modes", nargs="+", choices=MODES, default=["fp16", "dequant", "hack"])
    runs.add_argument("--link-gbps", nargs="+", type=float, default=[1.0, 10.0, 25.0],
                      help="emulated prefill -> decode KV link bandwidths, Gbit/s")
    runs.add_argument("--network", choices=NETWORKS, default="auto",
                      help="how the link is emulated: netns (network namespaces, tc-shaped veth), bucket (token "
                           "bucket in the prefill process), auto (netns where root/ip/tc allow it, else bucket)")
    runs.add_argument("--netns", dest="network", action="store_const", const="netns", help="same as --network netns")
    runs.add_argument("--link-delay-ms", type=float, default=0.0,
                      help="netns: added one-way latency of the KV link (needs the netem qdisc)")
    runs.add_argument("--prefill-arg", action="append", default=[], metavar="FLAG",
                      help="extra flag for the prefill instance, e.g. --prefill-arg=--device=cuda (repeatable)")
    runs.add_argument("--decode-arg", action="append", default=[], metavar="FLAG",
                      help="extra flag for the decode instance, e.g. --decode-arg=--kv-memory-mb=8192 (repeatable)")
    runs.add_argument("--profile-attention", action=argparse.BooleanOptionalAction, default=True,
                      help="time decode attention on CUDA too (synchronizes around it; CPU is always timed)")
    runs.add_argument("--start-timeout", type=float, default=300.0, help="seconds for a cluster to get ready")
    trace = parser.add_argument_group("trace")
    trace.add_argument("--dataset-path", type=Path, required=True, help="text file the prompts are cut from")
    trace.add_argument("--num-prompts", type=int, default=16)
    trace.add_argument("--input-len", type=int, default=448, help="prompt tokens (exact)")
    trace.add_argument("--output-len", type=int, default=64, help="generated tokens (exact: ignore_eos)")
    trace.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (Poisson); inf = all at once")
    trace.add_argument("--max-concurrency", type=int, default=4, help="requests in flight at most (default 4)")
    trace.add_argument("--seed", type=int, default=0)
    output = parser.add_argument_group("results")
    output.add_argument("--result-dir", type=Path, default=Path("."))
    output.add_argument("--label", default="experiment", help="file name stem of the JSON, markdown and PNG")


def run(args: argparse.Namespace) -> int:
    """Entry point of the `experiment` sub-command: 0 when every request of every configuration succeeded."""
    config = experiment_config(args)
    document = run_experiment(config)
    paths = save_results(document, args.result_dir, args.label)
    print(format_markdown([ExperimentRow(**row) for row in document["rows"]]))
    print("Saved " + ", ".join(str(path) for path in paths))
    return 0 if all(row["failed"] == 0 for row in document["rows"]) else 1


def experiment_config(args: argparse.Namespace) -> ExperimentConfig:
    model = args.model or str(ensure_random_model(args.random_model, args.random_model_layers))
    return ExperimentConfig(
        model=model, dataset_path=args.dataset_path, kv_modes=tuple(args.kv_modes), link_gbps=tuple(args.link_gbps),
        num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
        request_rate=args.request_rate, max_concurrency=args.max_concurrency, seed=args.seed,
        profile_attention=args.profile_attention, prefill_args=tuple(args.prefill_arg),
        decode_args=tuple(args.decode_arg), start_timeout_s=args.start_timeout,
        network=choose_network(args.network), link_delay_ms=args.link_delay_ms,
    )


def choose_network(requested: str) -> str:
    """netns or bucket: `auto` is netns where namespaces work here; an explicit netns that cannot is an error."""
    if requested == "bucket":
        return requested
    reason = unavailable_reason()
    if reason is None:
        return "netns"
    if requested == "netns":
        raise BenchmarkError(f"--network netns: {reason}")
    log.info("emulating the KV link with a token bucket: %s", reason)
    return "bucket"


def ensure_random_model(shape: str, num_layers: int) -> Path:
    """The random checkpoint of `shape` with `num_layers` layers, written on first use."""
    if num_layers < 1:
        raise BenchmarkError(f"--random-model-layers must be >= 1, got {num_layers}")
    directory = cache_dir() / f"random-{shape}-{num_layers}layers"
    if directory.is_dir():
        return directory
    log.info("writing the random %s checkpoint (%d layers) to %s", shape, num_layers, directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".staging-"))
    try:  # written aside and renamed, so an interrupted write never leaves a half checkpoint behind
        write_random_checkpoint(staging, replace(RANDOM_MODEL_SHAPES[shape], num_layers=num_layers))
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


# -------------------------------------------------------------------------------------------- running


def run_experiment(config: ExperimentConfig) -> dict[str, Any]:
    """Every (bandwidth, mode) configuration in turn; returns the result document."""
    tokenizer = load_tokenizer(None, config.model)
    if tokenizer is None:
        raise BenchmarkError(f"--model {config.model} is not a local checkpoint directory")
    samples = sample_requests(config.dataset(), tokenizer)
    rows: list[ExperimentRow] = []
    for link_gbps in config.link_gbps:
        reference: list[str] | None = None  # the fp16 run's generated texts
        for kv_mode in config.ordered_modes():
            row = run_configuration(config, kv_mode, link_gbps, samples, tokenizer, reference)
            reference = row.generated_texts if kv_mode == "fp16" else reference
            rows.append(row)
            log.info("%s @ %g Gb/s: mean JCT %.1f ms, p99 %.1f ms, %.0f KV bytes/request, %d failed", kv_mode,
                     link_gbps, row.mean_jct_ms, row.p99_jct_ms, row.kv_bytes_per_request, row.failed)
    return {"settings": settings(config), "machine": machine(), "rows": [asdict(row) for row in rows]}


def run_configuration(config: ExperimentConfig, kv_mode: str, link_gbps: float, samples: list[SampleRequest],
                      tokenizer: PreTrainedTokenizerBase,
                      reference: list[str] | None) -> ExperimentRow:
    """Start the cluster, replay the trace, stop the cluster; the results as a row."""
    cluster_config = config.cluster(kv_mode, link_gbps)
    shape = LinkShape(link_gbps, config.link_delay_ms) if config.network == "netns" else None
    log.info("starting a %s cluster with a %g Gb/s KV link (%s)", kv_mode, link_gbps, config.network)
    with running_cluster(cluster_config, shape) as cluster:
        endpoint = EndpointConfig(f"{cluster.url}/v1/completions", cluster_config.served_model_name,
                                  ignore_eos=True, temperature=0.0, send_token_ids=True)
        outputs, duration_s, delta = asyncio.run(replay(cluster.url, endpoint, samples, config.load()))
    fill_output_tokens(outputs, tokenizer)
    metrics = calculate_metrics(outputs, duration_s, percentiles=[99.0])
    texts = [output.generated_text for output in outputs]
    agreement: Agreement | None = None
    if reference is not None:
        agreement = output_agreement(reference, texts, lambda text: encode(tokenizer, text), config.output_len)
    return build_row(kv_mode, link_gbps, metrics, jct_breakdown(delta), agreement, texts)


def probe_sample(sample: SampleRequest) -> SampleRequest:
    """The probe: the first prompt's first PROBE_TOKENS tokens, a few output tokens. It checks that the cluster
    answers and warms every process up; a full-length probe would double a long-prompt run's time."""
    if sample.prompt_token_ids is None:
        return replace(sample, expected_output_len=min(sample.expected_output_len, PROBE_OUTPUT_TOKENS))
    ids = sample.prompt_token_ids[:PROBE_TOKENS]
    return replace(sample, prompt_token_ids=ids, prompt_len=len(ids),
                   expected_output_len=min(sample.expected_output_len, PROBE_OUTPUT_TOKENS))


async def replay(url: str, endpoint: EndpointConfig, samples: list[SampleRequest],
                 load: LoadConfig) -> tuple[list[RequestOutput], float, MetricSnapshot]:
    """Probe (which also warms the cluster up), then the timed requests between two /metrics scrapes."""
    async with make_http_client(load) as client:
        await probe(client, endpoint, probe_sample(samples[0]))
        before = await scrape(client, url)
        run = await send_all(client, endpoint, samples, load)
        finished = sum(output.success for output in run.outputs)
        deadline = time.monotonic() + METRICS_SETTLE_S
        while not is_settled(delta := snapshot_delta(before, await scrape(client, url)), finished):
            if time.monotonic() > deadline:
                raise BenchmarkError(f"the router's metrics did not count all {finished} finished requests "
                                     f"within {METRICS_SETTLE_S:g} s")
            await asyncio.sleep(0.1)
    return run.outputs, run.duration_s, delta


async def scrape(client: httpx.AsyncClient, url: str) -> MetricSnapshot:
    try:
        response = await client.get(f"{url}/metrics")
        response.raise_for_status()
    except httpx.HTTPError as error:
        raise BenchmarkError(f"cannot read {url}/metrics: {error}") from error
    return parse_metrics(response.text)


@contextmanager
def running_cluster(config: ClusterConfig, netns_link: LinkShape | None = None) -> Iterator[Cluster]:
    """A started cluster (in network namespaces joined by a `netns_link`-shaped KV link, when given) that is
    stopped on the way out, whatever happens: error, Ctrl-C or SIGTERM."""
    cluster = NetnsCluster(config, netns_link) if netns_link is not None else Cluster(config)
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    try:
        try:
            cluster.start()
        except ClusterStartError as error:
            raise BenchmarkError(f"the {config.kv_mode} cluster did not start: {error}") from error
        yield cluster
    finally:
        previous_sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the stop
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            cluster.stop()
        finally:
            signal.signal(signal.SIGINT, previous_sigint)
            signal.signal(signal.SIGTERM, previous_sigterm)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# -------------------------------------------------------------------------------------------- results


def settings(config: ExperimentConfig) -> dict[str, Any]:
    fields = asdict(config)
    fields["dataset_path"] = str(config.dataset_path)
    fields["request_rate"] = str(config.request_rate)  # JSON has no infinity
    return fields


def machine() -> dict[str, Any]:
    """Where the numbers come from: CPU model and cores, torch, and the GPU if the services could use one."""
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def save_results(document: dict[str, Any], result_dir: Path, label: str) -> list[Path]:
    """{label}.json, {label}.md and {label}.png in result_dir."""
    result_dir.mkdir(parents=True, exist_ok=True)
    rows = [ExperimentRow(**row) for row in document["rows"]]
    json_path, markdown_path, plot_path = (result_dir / f"{label}{suffix}" for suffix in (".json", ".md", ".png"))
    json_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    markdown_path.write_text(format_markdown(rows) + "\n", encoding="utf-8")
    run_settings = document["settings"]
    title = (f"{Path(run_settings['model']).name}: {run_settings['num_prompts']} prompts of "
             f"{run_settings['input_len']} + {run_settings['output_len']} tokens")
    plot_experiment(rows, plot_path, title)
    return [json_path, markdown_path, plot_path]
