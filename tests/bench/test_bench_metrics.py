"""Metric math of bench.hack_bench.metrics on hand-made request traces."""

import pytest

from bench.hack_bench.metrics import (
    build_timeline,
    calculate_metrics,
    latency_stats,
    meets_slos,
    output_len,
    summarize_errors,
    time_per_output_token,
)
from bench.hack_bench.records import RequestOutput


def _ok(ttft: float, itl: list[float], tokens: int | None, prompt_len: int = 10, start: float = 0.0) -> RequestOutput:
    latency = ttft + sum(itl)
    return RequestOutput(
        success=True, generated_text="x", prompt_len=prompt_len, output_tokens=tokens,
        ttft=ttft, itl=itl, latency=latency, start_time=start,
    )


def _failed(error: str) -> RequestOutput:
    return RequestOutput(success=False, prompt_len=7, error=error)


@pytest.fixture
def traces() -> list[RequestOutput]:
    return [
        _ok(0.100, [0.020, 0.030, 0.050], tokens=4, prompt_len=17),  # latency 0.2, TPOT 0.1 / 3
        _ok(0.300, [], tokens=1, prompt_len=1),  # single token: no TPOT
        _failed("HTTP 400: prompt rejected"),
        _failed("HTTP 400: prompt rejected"),
        _failed("stream ended without [DONE]"),
    ]


def test_output_len_prefers_usage_then_counts_chunks() -> None:
    assert output_len(_ok(0.1, [0.1, 0.1], tokens=9)) == 9
    assert output_len(_ok(0.1, [0.1, 0.1], tokens=None)) == 3


def test_tpot_excludes_first_token() -> None:
    assert time_per_output_token(_ok(0.1, [0.02, 0.03, 0.05], tokens=4)) == pytest.approx(0.1 / 3)
    # 7 tokens over 3 chunks: TPOT uses the token count, not the chunk count.
    assert time_per_output_token(_ok(0.5, [0.3, 0.3], tokens=7)) == pytest.approx(0.6 / 6)
    assert time_per_output_token(_ok(0.3, [], tokens=1)) is None


def test_counts_totals_and_throughputs(traces: list[RequestOutput]) -> None:
    metrics = calculate_metrics(traces, duration_s=2.0, percentiles=[90, 99])
    assert (metrics.completed, metrics.failed) == (2, 3)
    assert metrics.total_input == 18  # failed prompts are not counted
    assert metrics.total_output == 5
    assert metrics.output_lens == [4, 1, 0, 0, 0]
    assert metrics.request_throughput == pytest.approx(1.0)
    assert metrics.output_throughput == pytest.approx(2.5)
    assert metrics.total_token_throughput == pytest.approx(11.5)
    assert metrics.request_goodput is None


def test_latency_statistics_in_ms(traces: list[RequestOutput]) -> None:
    latencies = calculate_metrics(traces, duration_s=2.0, percentiles=[90, 99]).latencies
    ttft = latencies["ttft"]
    assert (ttft.mean, ttft.median, ttft.std) == pytest.approx((200.0, 200.0, 100.0))
    assert ttft.percentiles[90] == pytest.approx(100 + 0.9 * 200)  # linear interpolation
    assert latencies["tpot"].mean == pytest.approx(100 / 3)  # only the request with > 1 token
    itl = latencies["itl"]
    assert itl.mean == pytest.approx(100 / 3)
    assert itl.median == pytest.approx(30.0)
    assert itl.percentiles[99] == pytest.approx(30 + 0.98 * 20)
    e2el = latencies["e2el"]
    assert (e2el.mean, e2el.percentiles[99]) == pytest.approx((250.0, 200 + 0.99 * 100))


@pytest.mark.parametrize(
    ("slos", "good"),
    [
        ({"ttft": 150}, 1),  # only the first request starts fast enough
        ({"tpot": 30}, 1),  # first has TPOT 33.3 ms; single-token request counts TPOT as 0
        ({"e2el": 300}, 2),
        ({"ttft": 350, "tpot": 40, "e2el": 250}, 1),
        ({"ttft": 50}, 0),
    ],
)
def test_goodput_counts_successful_requests_meeting_every_slo(
    traces: list[RequestOutput], slos: dict[str, float], good: int
) -> None:
    metrics = calculate_metrics(traces, duration_s=4.0, goodput_slos_ms=slos)
    assert metrics.request_goodput == pytest.approx(good / 4.0)


def test_failed_request_never_meets_slos() -> None:
    assert not meets_slos(_failed("boom"), {"ttft": 1e9})


def test_failures_are_summarised_most_frequent_first(traces: list[RequestOutput]) -> None:
    assert list(summarize_errors(traces).items()) == [
        ("HTTP 400: prompt rejected", 2),
        ("stream ended without [DONE]", 1),
    ]


def test_all_failed_gives_zero_statistics() -> None:
    metrics = calculate_metrics([_failed("a"), _failed("b")], duration_s=1.0, goodput_slos_ms={"ttft": 10})
    assert (metrics.completed, metrics.failed, metrics.total_output) == (0, 2, 0)
    assert metrics.latencies["ttft"].mean == 0.0
    assert metrics.latencies["itl"].percentiles[99.0] == 0.0
    assert metrics.request_goodput == 0.0
    assert metrics.max_output_tokens_per_s == 0.0


def test_latency_stats_of_empty_sample_is_zero() -> None:
    stats = latency_stats([], [50, 99.9])
    assert (stats.mean, stats.median, stats.std) == (0.0, 0.0, 0.0)
    assert stats.percentiles == {50.0: 0.0, 99.9: 0.0}


def test_timeline_spreads_tokens_over_chunks_and_counts_in_flight() -> None:
    first = _ok(0.5, [1.0], tokens=4, start=0.0)  # chunks at 0.5 s and 1.5 s, 2 tokens each
    second = _ok(0.1, [], tokens=1, start=1.2)  # one chunk at 1.3 s
    timeline = build_timeline([first, second, _failed("x")], bin_s=1.0)
    assert timeline.output_tokens_per_s == pytest.approx([2.0, 3.0])
    assert timeline.concurrent_requests == [1, 2]
    half_bins = build_timeline([first, second], bin_s=0.5)
    assert half_bins.output_tokens_per_s == pytest.approx([0.0, 4.0, 2.0, 4.0])
    metrics = calculate_metrics([first, second], duration_s=2.0)
    assert (metrics.max_output_tokens_per_s, metrics.max_concurrent_requests) == (3.0, 2)


def test_duration_must_be_positive(traces: list[RequestOutput]) -> None:
    with pytest.raises(ValueError, match="duration"):
        calculate_metrics(traces, duration_s=0.0)
