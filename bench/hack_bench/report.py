"""The printed results table and the JSON result file of `hack-bench serve` (vLLM's layout and keys)."""

import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.hack_bench.metrics import BenchmarkMetrics, Timeline, time_per_output_token
from bench.hack_bench.records import BenchmarkError, RequestOutput

LABEL_WIDTH = 40
TABLE_WIDTH = 50
METRIC_TITLES = {
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
}
MAX_ERRORS_SHOWN = 5


def percentile_key(p: float) -> str:
    """'99' for 99.0, '99.9' for 99.9: the p-part of keys such as p99_ttft_ms."""
    return str(int(p)) if float(p).is_integer() else str(p)


def _row(label: str, value: Any) -> str:
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{label:<{LABEL_WIDTH}} {text}"


def _rule(title: str, fill: str) -> str:
    return f"{title:{fill}^{TABLE_WIDTH}}"


def format_table(
    metrics: BenchmarkMetrics,
    selected_metrics: Sequence[str],
    request_rate: float,
    max_concurrency: int | None,
) -> str:
    """The results table printed after a run, in the shape of vLLM's."""
    lines = [_rule(" Serving Benchmark Result ", "=")]
    lines += [_row("Successful requests:", metrics.completed), _row("Failed requests:", metrics.failed)]
    if max_concurrency is not None:
        lines.append(_row("Maximum request concurrency:", max_concurrency))
    if not math.isinf(request_rate):
        lines.append(_row("Request rate configured (RPS):", float(request_rate)))
    lines += [
        _row("Benchmark duration (s):", metrics.duration_s),
        _row("Total input tokens:", metrics.total_input),
        _row("Total generated tokens:", metrics.total_output),
        _row("Request throughput (req/s):", metrics.request_throughput),
    ]
    if metrics.request_goodput is not None:
        lines.append(_row("Request goodput (req/s):", metrics.request_goodput))
    lines += [
        _row("Output token throughput (tok/s):", metrics.output_throughput),
        _row("Peak output token throughput (tok/s):", metrics.max_output_tokens_per_s),
        _row("Peak concurrent requests:", metrics.max_concurrent_requests),
        _row("Total token throughput (tok/s):", metrics.total_token_throughput),
    ]
    for name in selected_metrics:
        lines += _latency_rows(metrics, name)
    lines += _error_rows(metrics.errors)
    lines.append("=" * TABLE_WIDTH)
    return "\n".join(lines)


def _latency_rows(metrics: BenchmarkMetrics, name: str) -> list[str]:
    short, title = METRIC_TITLES[name]
    stats = metrics.latencies[name]
    rows = [_rule(title, "-"), _row(f"Mean {short} (ms):", stats.mean), _row(f"Median {short} (ms):", stats.median)]
    rows += [_row(f"P{percentile_key(p)} {short} (ms):", v) for p, v in stats.percentiles.items()]
    return rows


def _error_rows(errors: Mapping[str, int]) -> list[str]:
    if not errors:
        return []
    rows = [_rule("Failures", "-")]
    for message, count in list(errors.items())[:MAX_ERRORS_SHOWN]:
        rows.append(f"{count:>6} x {message}")
    hidden = len(errors) - MAX_ERRORS_SHOWN
    if hidden > 0:
        rows.append(f"       ... and {hidden} other error messages (see the result file)")
    return rows


def summary_fields(metrics: BenchmarkMetrics) -> dict[str, Any]:
    """Scalar results under vLLM's key names (latency keys for all four metrics, in ms)."""
    fields: dict[str, Any] = {
        "duration": metrics.duration_s,
        "completed": metrics.completed,
        "failed": metrics.failed,
        "total_input_tokens": metrics.total_input,
        "total_output_tokens": metrics.total_output,
        "request_throughput": metrics.request_throughput,
        "request_goodput": metrics.request_goodput,
        "output_throughput": metrics.output_throughput,
        "total_token_throughput": metrics.total_token_throughput,
        "max_output_tokens_per_s": metrics.max_output_tokens_per_s,
        "max_concurrent_requests": metrics.max_concurrent_requests,
    }
    for name, stats in metrics.latencies.items():
        fields[f"mean_{name}_ms"] = stats.mean
        fields[f"median_{name}_ms"] = stats.median
        fields[f"std_{name}_ms"] = stats.std
        for p, value in stats.percentiles.items():
            fields[f"p{percentile_key(p)}_{name}_ms"] = value
    return fields


def per_request_fields(outputs: Sequence[RequestOutput], metrics: BenchmarkMetrics) -> dict[str, list[Any]]:
    """Per-request arrays (seconds, as in vLLM's result file); failed requests keep their slot."""
    return {
        "input_lens": [o.prompt_len for o in outputs],
        "output_lens": metrics.output_lens,
        "ttfts": [o.ttft if o.success else None for o in outputs],
        "tpots": [time_per_output_token(o) if o.success else None for o in outputs],
        "itls": [o.itl for o in outputs],
        "e2els": [o.latency if o.success else None for o in outputs],
        "start_times": [o.start_time for o in outputs],
        "generated_texts": [o.generated_text for o in outputs],
        "errors": [o.error for o in outputs],
    }


def build_result(
    run_info: Mapping[str, Any], metrics: BenchmarkMetrics, outputs: Sequence[RequestOutput], timeline: Timeline
) -> dict[str, Any]:
    """The whole result document: run settings, summary, error summary, timeline and per-request arrays."""
    return {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        **run_info,
        **summary_fields(metrics),
        "error_summary": metrics.errors,
        "timeline": {
            "bin_s": timeline.bin_s,
            "output_tokens_per_s": timeline.output_tokens_per_s,
            "concurrent_requests": timeline.concurrent_requests,
        },
        **per_request_fields(outputs, metrics),
    }


def default_result_filename(label: str, request_rate: float, max_concurrency: int | None, model: str) -> str:
    """vLLM's naming: {label}-{rate}qps[-concurrency{n}]-{model}-{date}.json."""
    concurrency = f"-concurrency{max_concurrency}" if max_concurrency is not None else ""
    model_name = Path(model).name or "model"
    return f"{label}-{request_rate}qps{concurrency}-{model_name}-{datetime.now():%Y%m%d-%H%M%S}.json"


def save_result(result: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def run_name(result: Mapping[str, Any], fallback: str = "") -> str:
    """How a run is called in tables and plots: its kv_mode metadata, else its label, else `fallback`."""
    return str(result.get("kv_mode") or result.get("label") or fallback)


def load_result(path: Path) -> dict[str, Any]:
    """A result file written by `save_result` (or by `vllm bench serve --save-result`)."""
    try:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchmarkError(f"cannot read result file {path}: {exc}") from exc
    if not isinstance(result, dict):
        raise BenchmarkError(f"{path} is not a benchmark result (expected a JSON object)")
    return result
