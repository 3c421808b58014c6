"""Printed tables and result documents of bench.hack_bench.report and .compare, and redrawing plots from files."""

import json
import math
from pathlib import Path

import pytest

from bench.hack_bench.compare import comparison_rows, format_cell, format_comparison, run_labels
from bench.hack_bench.metrics import build_timeline, calculate_metrics
from bench.hack_bench.plots import plot_comparison, plot_latency_cdfs, plot_throughput
from bench.hack_bench.records import BenchmarkError, RequestOutput
from bench.hack_bench.report import build_result, default_result_filename, format_table, percentile_key


@pytest.fixture
def outputs() -> list[RequestOutput]:
    ok = RequestOutput(success=True, generated_text="ab", prompt_len=17, output_tokens=3,
                       ttft=0.05, itl=[0.01, 0.02], latency=0.08, start_time=0.1)
    return [ok, RequestOutput(success=False, prompt_len=1, error="HTTP 503: overloaded", start_time=0.2)]


def test_percentile_key_matches_vllm() -> None:
    assert [percentile_key(p) for p in (99.0, 90, 99.9)] == ["99", "90", "99.9"]


def test_table_lists_counts_latencies_and_failures(outputs: list[RequestOutput]) -> None:
    metrics = calculate_metrics(outputs, duration_s=0.5, percentiles=[99])
    table = format_table(metrics, ["ttft", "e2el"], request_rate=math.inf, max_concurrency=None).splitlines()
    assert table[0] == "============ Serving Benchmark Result ============"
    assert "Successful requests:                     1" in table
    assert "Output token throughput (tok/s):         6.00" in table
    assert "P99 TTFT (ms):                           50.00" in table
    assert "Mean E2EL (ms):                          80.00" in table
    assert not any("TPOT" in line or "Request rate" in line for line in table)
    assert "     1 x HTTP 503: overloaded" in table


def test_result_document_keeps_failed_requests_in_place(outputs: list[RequestOutput]) -> None:
    metrics = calculate_metrics(outputs, duration_s=0.5, percentiles=[90])
    result = build_result({"label": "x"}, metrics, outputs, build_timeline(outputs, 0.1))
    assert (result["completed"], result["failed"], result["label"]) == (1, 1, "x")
    assert result["ttfts"] == [0.05, None] and result["errors"] == ["", "HTTP 503: overloaded"]
    assert result["tpots"][0] == pytest.approx(0.015)
    assert result["p90_itl_ms"] == pytest.approx(19.0)
    json.dumps(result)  # serialisable as is


def test_default_filename_follows_vllm() -> None:
    name = default_result_filename("fp16", 4.0, 8, "/models/stories260K")
    assert name.startswith("fp16-4.0qps-concurrency8-stories260K-") and name.endswith(".json")
    assert default_result_filename("hack", math.inf, None, "m").startswith("hack-infqps-m-")


def test_compare_cells_rows_and_labels() -> None:
    assert format_cell(None, 1.0) == "-"
    assert format_cell(3, None) == "3"
    assert format_cell(2.0, 4.0) == "2.00 (x0.50)"
    assert format_cell(5.0, 0) == "5.00"
    runs = [{"completed": 3, "mean_ttft_ms": 1.0, "p99_ttft_ms": 2.0}, {"completed": 3, "p90_ttft_ms": 1.5}]
    assert [key for key, _ in comparison_rows(runs)] == ["completed", "mean_ttft_ms", "p90_ttft_ms", "p99_ttft_ms"]
    table = format_comparison(runs, ["a", "b"]).splitlines()
    assert table[2].split() == ["Successful", "requests", "3", "3", "(x1.00)"]
    assert table[3].split() == ["Mean", "TTFT", "(ms)", "1.00", "-"]
    paths = [Path("x/run1.json"), Path("y/run2.json")]
    assert run_labels(paths, [{"label": "same"}, {"label": "same"}], None) == ["run1", "run2"]
    with pytest.raises(BenchmarkError, match="2 result files"):
        run_labels(paths, runs, ["only-one"])


def test_plots_redraw_from_result_files_even_without_data(outputs, tmp_path: Path) -> None:
    metrics = calculate_metrics(outputs, duration_s=0.5)
    result = build_result({"label": "x"}, metrics, outputs, build_timeline(outputs, 0.1))
    empty = {"completed": 0, "ttfts": [None], "timeline": {"bin_s": 1.0}}  # e.g. every request failed
    for document in (result, empty):
        assert plot_latency_cdfs(document, tmp_path / "cdf.png").stat().st_size > 0
        assert plot_throughput(document, tmp_path / "tp.png").stat().st_size > 0
    vllm_style = {"output_throughput": 10.0, "mean_ttft_ms": 1.0, "median_ttft_ms": 1.0}  # no per-request data
    assert plot_comparison([result, vllm_style], ["x", "vllm"], tmp_path / "cmp.png").stat().st_size > 0
