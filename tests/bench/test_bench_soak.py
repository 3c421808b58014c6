"""hack-bench soak: the window statistics and the report (the load loop itself is a benchmark, run by hand)."""
from __future__ import annotations

import os

import psutil

from bench.hack_bench.cli import build_parser
from bench.hack_bench.records import RequestOutput
from bench.hack_bench.soak import ProcessSample, Window, _sample_processes, _window, format_report


def test_a_window_counts_errors_and_latency_percentiles() -> None:
    outputs = [RequestOutput(success=True, latency=0.1 * i, ttft=0.01 * i) for i in range(1, 101)]
    outputs.append(RequestOutput(error="HTTP 503: no healthy decode instance"))
    window = _window(30.0, outputs, {"me": psutil.Process(os.getpid())})
    assert window.requests == 101 and window.errors == 1 and window.error_kinds == {"HTTP 503": 1}
    assert abs(window.p50_latency_s - 5.05) < 1e-6 and window.p99_latency_s > 9.8
    assert window.processes[0].name == "me" and window.processes[0].rss_mib > 0 and window.processes[0].open_fds > 0


def test_a_dead_process_is_left_out_of_the_sample() -> None:
    dead = psutil.Popen(["true"])
    dead.wait()
    assert _sample_processes({"gone": dead}) == []


def test_the_report_shows_the_change_since_the_first_window() -> None:
    def window(end_s: float, rss: float, fds: int, requests: int = 10) -> Window:
        return Window(end_s, requests=requests, p99_latency_s=0.5, processes=[ProcessSample("decode-0", 7, rss, fds)])

    report = format_report([window(0, 100.0, 10, 0), window(30, 200.0, 12), window(60, 202.0, 12)], [0])
    assert "total: 20 requests, 0 errors" in report
    assert "   +1.0%" in report and "used KV blocks [0]" in report


def test_soak_is_a_subcommand() -> None:
    args = build_parser().parse_args(["soak", "--minutes", "1", "--concurrency", "8"])
    assert args.minutes == 1 and args.concurrency == 8 and args.window == 30
