"""PNG figures drawn from result documents (the dicts saved as JSON), so they can be redrawn from files.

Uses matplotlib's object API with the Agg canvas (no pyplot global state, no display needed).
"""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bench.hack_bench.metrics import MS_PER_S
from bench.hack_bench.report import run_name

CDF_PANELS = (("ttfts", "TTFT"), ("tpots", "TPOT"), ("e2els", "E2E latency"))
COMPARE_LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2el", "E2E latency"))
DPI = 120


def _values_ms(result: Mapping[str, Any], key: str) -> np.ndarray:
    return np.asarray([v for v in result.get(key) or [] if v is not None], dtype=float) * MS_PER_S


def _draw_cdf(ax: Axes, values_ms: np.ndarray, title: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of requests")
    ax.grid(alpha=0.3)
    if values_ms.size == 0:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    ordered = np.sort(values_ms)
    ax.step(ordered, np.arange(1, ordered.size + 1) / ordered.size, where="post")
    for q, style in ((50, ":"), (99, "--")):
        value = float(np.percentile(ordered, q))
        ax.axvline(value, color="grey", linestyle=style, label=f"p{q} {value:.1f} ms")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right", fontsize="small")


def plot_latency_cdfs(result: Mapping[str, Any], path: Path) -> Path:
    """TTFT, TPOT and E2E latency CDFs of the successful requests, side by side."""
    figure = Figure(figsize=(13, 4), layout="constrained")
    for ax, (key, title) in zip(figure.subplots(1, len(CDF_PANELS)), CDF_PANELS):
        _draw_cdf(ax, _values_ms(result, key), title)
    figure.suptitle(f"Latency CDFs: {run_name(result)} ({result.get('completed', 0)} successful requests)")
    figure.savefig(path, dpi=DPI)
    return path


def plot_throughput(result: Mapping[str, Any], path: Path) -> Path:
    """Output token throughput and requests in flight over the run."""
    timeline = result.get("timeline") or {}
    tokens = np.asarray(timeline.get("output_tokens_per_s") or [], dtype=float)
    in_flight = np.asarray(timeline.get("concurrent_requests") or [], dtype=float)
    seconds = np.arange(tokens.size) * float(timeline.get("bin_s", 1.0))
    figure = Figure(figsize=(9, 4), layout="constrained")
    ax = figure.subplots()
    ax.step(seconds, tokens, where="post", color="tab:blue", label="output tok/s")
    ax.set_xlabel("seconds since the first request")
    ax.set_ylabel("output tokens / s", color="tab:blue")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.step(seconds, in_flight, where="post", color="tab:orange", label="requests in flight")
    twin.set_ylabel("requests in flight", color="tab:orange")
    twin.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    twin.set_ylim(bottom=0)
    ax.set_title(f"Throughput over time: {run_name(result)}")
    figure.savefig(path, dpi=DPI)
    return path


def _comparison_percentile(results: Sequence[Mapping[str, Any]], name: str) -> str | None:
    """The highest pNN key present for `name` in every result (e.g. 'p99'), if any."""
    common = None
    for result in results:
        keys = {k.split("_")[0] for k in result if k.startswith("p") and k.endswith(f"_{name}_ms")}
        common = keys if common is None else common & keys
    if not common:
        return None
    return max(common, key=lambda key: float(key[1:]))


def _grouped_bars(ax: Axes, labels: Sequence[str], series: Mapping[str, Sequence[float]], title: str) -> None:
    width = 0.8 / max(len(series), 1)
    positions = np.arange(len(labels))
    for i, (name, values) in enumerate(series.items()):
        bars = ax.bar(positions + i * width, values, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize="x-small")
    ax.set_xticks(positions + width * (len(series) - 1) / 2, labels, rotation=15)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize="small")


def plot_comparison(results: Sequence[Mapping[str, Any]], labels: Sequence[str], path: Path) -> Path:
    """One figure: output throughput, and mean / median / tail of TTFT, TPOT and E2E latency per run."""
    figure = Figure(figsize=(12, 8), layout="constrained")
    axes = figure.subplots(2, 2).ravel()
    throughput = {"output tok/s": [float(r.get("output_throughput", 0.0)) for r in results]}
    _grouped_bars(axes[0], labels, throughput, "Output token throughput (tok/s)")
    for ax, (name, title) in zip(axes[1:], COMPARE_LATENCIES):
        stats = ["mean", "median"]
        tail = _comparison_percentile(results, name)
        if tail is not None:
            stats.append(tail)
        series = {stat: [float(r.get(f"{stat}_{name}_ms", 0.0)) for r in results] for stat in stats}
        _grouped_bars(ax, labels, series, f"{title} (ms)")
    figure.suptitle("hack-bench comparison")
    figure.savefig(path, dpi=DPI)
    return path
