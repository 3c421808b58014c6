"""`hack-bench compare A.json B.json ...`: one table and one plot across saved runs.

Works on files from `hack-bench serve --save-result` and from `vllm bench serve --save-result`. Columns after
the first show the ratio to the first run, e.g. fp16 baseline first, then dequant and hack.
"""

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.hack_bench.metrics import LATENCY_METRICS
from bench.hack_bench.plots import plot_comparison
from bench.hack_bench.records import BenchmarkError
from bench.hack_bench.report import load_result, run_name

SUMMARY_ROWS = (
    ("completed", "Successful requests"),
    ("failed", "Failed requests"),
    ("duration", "Duration (s)"),
    ("request_throughput", "Request throughput (req/s)"),
    ("request_goodput", "Request goodput (req/s)"),
    ("output_throughput", "Output token throughput (tok/s)"),
    ("total_token_throughput", "Total token throughput (tok/s)"),
    ("max_output_tokens_per_s", "Peak output throughput (tok/s)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", type=Path, help="result JSON files; the first is the baseline")
    parser.add_argument("--labels", nargs="+", help="one name per file (default: the file's label or name)")
    parser.add_argument("--plot", type=Path, default=Path("hack-bench-compare.png"), help="comparison PNG path")


def run(args: argparse.Namespace) -> int:
    results = [load_result(path) for path in args.results]
    labels = run_labels(args.results, results, args.labels)
    print(format_comparison(results, labels))
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    print(f"Saved plot to {plot_comparison(results, labels, args.plot)}")
    return 0


def run_labels(paths: Sequence[Path], results: Sequence[Mapping[str, Any]], labels: Sequence[str] | None) -> list[str]:
    """Explicit labels, else each result's metadata (kv_mode or label), else its file name; made unique."""
    if labels is not None:
        if len(labels) != len(paths):
            raise BenchmarkError(f"--labels got {len(labels)} names for {len(paths)} result files")
        return list(labels)
    names = [run_name(r, fallback=p.stem) for p, r in zip(paths, results)]
    if len(set(names)) < len(names):
        names = [p.stem for p in paths]
    return names


def comparison_rows(results: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(key, title) of every row that at least one result has, summary first, then latencies."""
    rows = [(key, title) for key, title in SUMMARY_ROWS if any(r.get(key) is not None for r in results)]
    for name in LATENCY_METRICS:
        tails = {k for r in results for k in r if k.startswith("p") and k.endswith(f"_{name}_ms")}
        keys = [f"mean_{name}_ms", f"median_{name}_ms", *sorted(tails, key=lambda k: float(k.split("_")[0][1:]))]
        rows += [(key, _latency_title(key)) for key in keys if any(r.get(key) is not None for r in results)]
    return rows


def _latency_title(key: str) -> str:
    """'p99_ttft_ms' -> 'P99 TTFT (ms)', 'mean_tpot_ms' -> 'Mean TPOT (ms)'."""
    stat, name, _ = key.split("_")
    return f"{stat.capitalize()} {name.upper()} (ms)"


def format_cell(value: Any, baseline: Any) -> str:
    """A number with its ratio to the baseline (when both are non-zero numbers), or '-' when missing."""
    if value is None:
        return "-"
    if not isinstance(value, (int, float)):
        return str(value)
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    if isinstance(baseline, (int, float)) and baseline:
        text += f" (x{value / baseline:.2f})"
    return text


def format_comparison(results: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> str:
    """Metrics as rows, runs as columns."""
    rows = comparison_rows(results)
    table = [["Metric", *labels]]
    for key, title in rows:
        baseline = results[0].get(key)
        cells = [format_cell(results[0].get(key), None)]
        cells += [format_cell(r.get(key), baseline) for r in results[1:]]
        table.append([title, *cells])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
