"""Benchmark metrics from request traces: pure functions, no I/O.

Definitions follow `vllm bench serve` so results can be compared directly:

- TTFT: request start to the first content chunk; E2EL: request start to the last content chunk;
- TPOT: (E2EL - TTFT) / (output tokens - 1), for requests with more than one output token;
- ITL: gaps between consecutive content chunks, pooled over all requests;
- throughputs divide by the wall-clock duration of the whole benchmark;
- goodput: successful requests meeting every given SLO (a request with one output token has TPOT 0 there).

Statistics of an empty sample are 0, as in vLLM. Percentiles use numpy's linear interpolation.
"""

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from bench.hack_bench.records import RequestOutput

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
GOODPUT_METRICS = ("ttft", "tpot", "e2el")
MS_PER_S = 1000.0


@dataclass(frozen=True)
class LatencyStats:
    """Summary of one latency metric, in milliseconds; `percentiles` maps p (0-100] to its value."""

    mean: float
    median: float
    std: float
    percentiles: dict[float, float]


@dataclass(frozen=True)
class Timeline:
    """Output tokens per second and requests in flight, in bins of `bin_s` seconds from the first request."""

    bin_s: float
    output_tokens_per_s: list[float]
    concurrent_requests: list[int]


@dataclass(frozen=True)
class BenchmarkMetrics:
    completed: int
    failed: int
    total_input: int
    total_output: int
    duration_s: float
    request_throughput: float
    request_goodput: float | None
    output_throughput: float
    total_token_throughput: float
    max_output_tokens_per_s: float
    max_concurrent_requests: int
    latencies: dict[str, LatencyStats]
    output_lens: list[int]
    errors: dict[str, int]


def output_len(output: RequestOutput) -> int:
    """Output tokens of a successful request: the server's usage count, else one token per content chunk."""
    if output.output_tokens is not None:
        return output.output_tokens
    return len(output.itl) + 1


def time_per_output_token(output: RequestOutput) -> float | None:
    """TPOT in seconds, or None when the request produced at most one token."""
    tokens = output_len(output)
    if tokens <= 1:
        return None
    return (output.latency - output.ttft) / (tokens - 1)


def latency_stats(values_s: Sequence[float], percentiles: Sequence[float]) -> LatencyStats:
    """Mean, median, std and the given percentiles of latencies in seconds, reported in milliseconds."""
    values = np.asarray(values_s, dtype=float) * MS_PER_S if len(values_s) else np.zeros(1)
    return LatencyStats(
        mean=float(np.mean(values)),
        median=float(np.median(values)),
        std=float(np.std(values)),
        percentiles={float(p): float(np.percentile(values, p)) for p in percentiles},
    )


def latency_samples(outputs: Sequence[RequestOutput]) -> dict[str, list[float]]:
    """Per-metric latency samples (seconds) over the successful requests."""
    done = [o for o in outputs if o.success]
    tpots = [t for t in (time_per_output_token(o) for o in done) if t is not None]
    return {
        "ttft": [o.ttft for o in done],
        "tpot": tpots,
        "itl": [gap for o in done for gap in o.itl],
        "e2el": [o.latency for o in done],
    }


def meets_slos(output: RequestOutput, slos_ms: Mapping[str, float]) -> bool:
    """Whether a request succeeded and met every SLO (milliseconds, keys from GOODPUT_METRICS)."""
    if not output.success:
        return False
    measured_s = {"ttft": output.ttft, "tpot": time_per_output_token(output) or 0.0, "e2el": output.latency}
    return all(measured_s[name] * MS_PER_S <= limit for name, limit in slos_ms.items())


def summarize_errors(outputs: Sequence[RequestOutput]) -> dict[str, int]:
    """Failure messages with their counts, most frequent first."""
    return dict(Counter(o.error or "unknown error" for o in outputs if not o.success).most_common())


def chunk_times(output: RequestOutput) -> list[float]:
    """Arrival time (seconds from benchmark start) of each content chunk of a successful request."""
    first = output.start_time + output.ttft
    return [first, *(first + np.cumsum(output.itl)).tolist()]


def build_timeline(outputs: Sequence[RequestOutput], bin_s: float = 1.0) -> Timeline:
    """Output tokens per second and concurrent requests over time, from the successful requests.

    A chunk holding several tokens (by the usage count) spreads them evenly over its chunks.
    """
    done = [o for o in outputs if o.success]
    if not done:
        return Timeline(bin_s, [], [])
    origin = min(o.start_time for o in done)
    end = max(o.start_time + o.latency for o in done)
    bins = int(np.floor((end - origin) / bin_s)) + 1
    tokens = np.zeros(bins)
    in_flight = np.zeros(bins, dtype=int)
    for output in done:
        times = chunk_times(output)
        indices = np.minimum(((np.asarray(times) - origin) / bin_s).astype(int), bins - 1)
        np.add.at(tokens, indices, output_len(output) / len(times))
        first_bin = int((output.start_time - origin) / bin_s)
        last_bin = min(int((output.start_time + output.latency - origin) / bin_s), bins - 1)
        in_flight[first_bin : last_bin + 1] += 1
    return Timeline(bin_s, (tokens / bin_s).tolist(), in_flight.tolist())


def calculate_metrics(
    outputs: Sequence[RequestOutput],
    duration_s: float,
    percentiles: Sequence[float] = (50.0, 90.0, 99.0),
    goodput_slos_ms: Mapping[str, float] | None = None,
) -> BenchmarkMetrics:
    """All benchmark metrics for `outputs` collected over `duration_s` seconds of wall-clock time."""
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    output_lens = [output_len(o) if o.success else 0 for o in outputs]
    total_input = sum(o.prompt_len or 0 for o in outputs if o.success)
    total_output = sum(output_lens)
    completed = sum(o.success for o in outputs)
    samples = latency_samples(outputs)
    peak = build_timeline(outputs, bin_s=1.0)
    goodput = None
    if goodput_slos_ms:
        goodput = sum(meets_slos(o, goodput_slos_ms) for o in outputs) / duration_s
    return BenchmarkMetrics(
        completed=completed,
        failed=len(outputs) - completed,
        total_input=total_input,
        total_output=total_output,
        duration_s=duration_s,
        request_throughput=completed / duration_s,
        request_goodput=goodput,
        output_throughput=total_output / duration_s,
        total_token_throughput=(total_input + total_output) / duration_s,
        max_output_tokens_per_s=max(peak.output_tokens_per_s, default=0.0),
        max_concurrent_requests=max(peak.concurrent_requests, default=0),
        latencies={name: latency_stats(samples[name], percentiles) for name in LATENCY_METRICS},
        output_lens=output_lens,
        errors=summarize_errors(outputs),
    )
