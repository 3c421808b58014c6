"""`hack-bench serve`: benchmark a running OpenAI-compatible server, like `vllm bench serve`.

Example (HACK serve router on port 8000, the tiny stories model):

    hack-bench serve --model /work/shared/models/stories260K --dataset-name random \\
        --random-input-len 200 --random-output-len 64 --num-prompts 100 --request-rate 8 \\
        --save-result --result-dir results --metadata kv_mode=hack
"""

import argparse
import asyncio
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from transformers import PreTrainedTokenizerBase

from bench.hack_bench import plots
from bench.hack_bench.client import EndpointConfig, endpoint_is_chat, first_model_id, server_model_root
from bench.hack_bench.dataset import DATASET_NAMES, DatasetConfig, count_tokens, load_tokenizer, sample_requests
from bench.hack_bench.metrics import GOODPUT_METRICS, LATENCY_METRICS, build_timeline, calculate_metrics
from bench.hack_bench.records import BenchmarkError, RequestOutput
from bench.hack_bench.report import build_result, default_result_filename, format_table, save_result
from bench.hack_bench.runner import LoadConfig, make_http_client, run_benchmark

TIMELINE_BINS = 60  # resolution of the throughput-over-time plot
PLOTS = {"latency_cdf": plots.plot_latency_cdfs, "throughput": plots.plot_throughput}  # file suffix -> drawer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`vllm bench serve` flag names wherever the concept is the same."""
    _add_server_arguments(parser.add_argument_group("server"))
    _add_dataset_arguments(parser.add_argument_group("dataset"))
    _add_load_arguments(parser.add_argument_group("load"))
    _add_output_arguments(parser.add_argument_group("results"))


def _add_server_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--base-url", help="server URL; overrides --host/--port")
    group.add_argument("--host", default="127.0.0.1")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument("--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions")
    group.add_argument("--model", help="model name sent to the server (default: first of /v1/models)")
    group.add_argument("--served-model-name", help="name to send when --model is a local path")
    group.add_argument("--tokenizer", help="local tokenizer directory (default: --model when it is a directory)")
    group.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default greedy)")
    group.add_argument("--ignore-eos", action="store_true", help="send ignore_eos=true so outputs run to length")
    group.add_argument("--request-timeout", type=float, default=3600.0, help="seconds per request")


def _add_dataset_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--dataset-name", choices=DATASET_NAMES, default="random")
    group.add_argument("--dataset-path", type=Path, help="file for the sharegpt, text and long datasets")
    group.add_argument("--num-prompts", type=int, default=1000)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--prompt-format", choices=("text", "token-ids"), default="text",
                       help="send prompts as text or as token ids (completions endpoint only)")
    group.add_argument("--random-input-len", type=int, default=1024)
    group.add_argument("--random-output-len", type=int, default=128)
    group.add_argument("--random-range-ratio", type=float, default=0.0,
                       help="lengths uniform in [len * (1 - r), len * (1 + r)]")
    group.add_argument("--sharegpt-output-len", type=int, help="fixed output length (default: the reply's)")
    group.add_argument("--text-output-len", type=int, default=128)
    group.add_argument("--long-input-len", type=int, default=1024)
    group.add_argument("--long-output-len", type=int, default=128)


def _add_load_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--request-rate", type=float, default=math.inf, help="requests/s; inf sends all at once")
    group.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 = Poisson, < 1 burstier")
    group.add_argument("--max-concurrency", type=int, help="cap on requests in flight")
    group.add_argument("--num-warmups", type=int, default=0, help="untimed requests before the run")
    group.add_argument("--disable-tqdm", action="store_true")


def _add_output_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el",
                       help=f"comma-separated subset of {','.join(LATENCY_METRICS)} to print")
    group.add_argument("--metric-percentiles", default="90,99", help="comma-separated percentiles, e.g. 50,90,99")
    group.add_argument("--goodput", nargs="+", metavar="METRIC:MS",
                       help=f"SLOs for goodput, metrics from {','.join(GOODPUT_METRICS)}, e.g. ttft:500 tpot:50")
    group.add_argument("--label", default="hack-bench", help="run label (file name prefix, plot titles)")
    group.add_argument("--metadata", nargs="*", metavar="KEY=VALUE", default=[],
                       help="extra fields saved in the result file, e.g. kv_mode=hack")
    group.add_argument("--save-result", action="store_true", help="write the JSON result and PNG plots")
    group.add_argument("--result-dir", type=Path, default=Path("."))
    group.add_argument("--result-filename", help="default: {label}-{rate}qps-{model}-{date}.json")
    group.add_argument("--no-plots", action="store_true", help="save the JSON result without PNG plots")


def parse_goodput(pairs: Sequence[str] | None) -> dict[str, float]:
    """`ttft:500 tpot:50` -> {'ttft': 500.0, 'tpot': 50.0}, validated."""
    slos: dict[str, float] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition(":")
        if not sep or name not in GOODPUT_METRICS:
            raise BenchmarkError(f"--goodput takes METRIC:MS with METRIC in {GOODPUT_METRICS}, got {pair!r}")
        try:
            slos[name] = float(value)
        except ValueError:
            raise BenchmarkError(f"--goodput value must be a number of milliseconds, got {pair!r}") from None
        if slos[name] < 0:
            raise BenchmarkError(f"--goodput value must be >= 0, got {pair!r}")
    return slos


def parse_percentile_metrics(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in LATENCY_METRICS]
    if unknown or not names:
        raise BenchmarkError(f"--percentile-metrics takes names from {LATENCY_METRICS}, got {text!r}")
    return names


def parse_percentiles(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise BenchmarkError(f"--metric-percentiles must be comma-separated numbers, got {text!r}") from None
    if not values or not all(0 < p <= 100 for p in values):
        raise BenchmarkError(f"--metric-percentiles must be in (0, 100], got {text!r}")
    return values


def parse_metadata(pairs: Sequence[str]) -> dict[str, str]:
    metadata = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BenchmarkError(f"--metadata takes KEY=VALUE, got {pair!r}")
        metadata[key] = value
    return metadata


def base_url(args: argparse.Namespace) -> str:
    return (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")


def dataset_config(args: argparse.Namespace) -> DatasetConfig:
    return DatasetConfig(
        name=args.dataset_name,
        path=args.dataset_path,
        num_prompts=args.num_prompts,
        seed=args.seed,
        random_input_len=args.random_input_len,
        random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio,
        sharegpt_output_len=args.sharegpt_output_len,
        text_output_len=args.text_output_len,
        long_input_len=args.long_input_len,
        long_output_len=args.long_output_len,
    )


def load_config(args: argparse.Namespace) -> LoadConfig:
    return LoadConfig(
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        num_warmups=args.num_warmups,
        request_timeout_s=args.request_timeout,
        seed=args.seed,
        disable_tqdm=args.disable_tqdm,
    )


def endpoint_config(args: argparse.Namespace, model: str) -> EndpointConfig:
    return EndpointConfig(
        api_url=base_url(args) + args.endpoint,
        model=args.served_model_name or model,
        chat=endpoint_is_chat(args.endpoint),
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        send_token_ids=args.prompt_format == "token-ids",
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of the `serve` sub-command: returns the exit status (1 when every request failed)."""
    result = asyncio.run(benchmark(args))
    return 0 if result["completed"] > 0 else 1


async def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run one benchmark from parsed `serve` arguments; prints the table and returns the result document."""
    goodput_slos = parse_goodput(args.goodput)
    selected_metrics = parse_percentile_metrics(args.percentile_metrics)
    percentiles = parse_percentiles(args.metric_percentiles)
    metadata = parse_metadata(args.metadata)
    load = load_config(args)
    dataset = dataset_config(args)
    tokenizer = load_tokenizer(args.tokenizer, args.model)
    async with make_http_client(load) as client:
        if tokenizer is None:  # as `vllm bench serve`: the server's model directory holds the tokenizer
            tokenizer = await tokenizer_from_server(client, base_url(args), args.model)
        samples = sample_requests(dataset, tokenizer)
        model = args.model or await first_model_id(client, base_url(args))
        endpoint = endpoint_config(args, model)
        run_result = await run_benchmark(client, endpoint, samples, load)
    outputs = run_result.outputs
    fill_output_tokens(outputs, tokenizer)
    metrics = calculate_metrics(outputs, run_result.duration_s, percentiles, goodput_slos)
    print(format_table(metrics, selected_metrics, load.request_rate, load.max_concurrency))
    run_info = _run_info(args, endpoint, metadata)
    timeline = build_timeline(outputs, bin_s=_timeline_bin_s(run_result.duration_s))
    result = build_result(run_info, metrics, outputs, timeline)
    if args.save_result:
        _save(args, result, model)
    return result


async def tokenizer_from_server(client: httpx.AsyncClient, url: str, model: str | None
                                ) -> PreTrainedTokenizerBase | None:
    """The tokenizer of the model the server reports (its /v1/models `root`), when that directory is readable
    here; None otherwise (datasets that need one then say so)."""
    root = await server_model_root(client, url, model)
    if root is None or not Path(root).is_dir():
        return None
    print(f"tokenizer: {root} (the server's model directory)")
    return load_tokenizer(root, None)


def fill_output_tokens(outputs: list[RequestOutput], tokenizer: PreTrainedTokenizerBase | None) -> None:
    """In place: count output tokens with the tokenizer where the server sent no usage (as vLLM does)."""
    if tokenizer is None:
        return
    for output in outputs:
        if output.success and output.output_tokens is None:
            output.output_tokens = count_tokens(tokenizer, output.generated_text)


def _timeline_bin_s(duration_s: float) -> float:
    """1 s bins for long runs, finer for short ones so the plot still has shape."""
    return min(1.0, max(duration_s / TIMELINE_BINS, 1e-3))


def _run_info(args: argparse.Namespace, endpoint: EndpointConfig, metadata: dict[str, str]) -> dict[str, Any]:
    return {
        "label": args.label,
        "backend": "openai-chat" if endpoint.chat else "openai",
        "base_url": base_url(args),
        "endpoint": args.endpoint,
        "model_id": endpoint.model,
        "tokenizer_id": args.tokenizer or args.model,
        "dataset_name": args.dataset_name,
        "num_prompts": args.num_prompts,
        "request_rate": args.request_rate,
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "ignore_eos": args.ignore_eos,
        "prompt_format": args.prompt_format,
        "seed": args.seed,
        **metadata,
    }


def _save(args: argparse.Namespace, result: dict[str, Any], model: str) -> None:
    filename = args.result_filename or default_result_filename(
        args.label, args.request_rate, args.max_concurrency, model
    )
    path = Path(args.result_dir) / filename
    save_result(result, path)
    print(f"Saved result to {path}")
    if not args.no_plots:
        for suffix, plot in PLOTS.items():
            print(f"Saved plot to {plot(result, path.with_name(f'{path.stem}_{suffix}.png'))}")
