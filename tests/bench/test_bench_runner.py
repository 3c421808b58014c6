"""Arrivals, concurrency cap, probe and warm-up of bench.hack_bench.runner."""

import asyncio
import math

import numpy as np
import pytest

from bench.hack_bench.client import EndpointConfig
from bench.hack_bench.records import BenchmarkError, SampleRequest
from bench.hack_bench.runner import BenchmarkRun, LoadConfig, arrival_offsets, make_http_client, run_benchmark

FAKE_MODEL = "fake-model"


def _run(server, samples: list[SampleRequest], model: str = FAKE_MODEL, **load_fields) -> BenchmarkRun:
    endpoint = EndpointConfig(api_url=server.base_url + "/v1/completions", model=model)
    load = LoadConfig(disable_tqdm=True, **load_fields)

    async def go() -> BenchmarkRun:
        async with make_http_client(load) as client:
            return await run_benchmark(client, endpoint, samples, load)

    return asyncio.run(go())


def test_infinite_rate_sends_everything_at_once() -> None:
    assert arrival_offsets(17, math.inf, 1.0, np.random.default_rng(0)).tolist() == [0.0] * 17
    assert arrival_offsets(1, 5.0, 1.0, np.random.default_rng(0)).tolist() == [0.0]


def test_poisson_offsets_have_the_requested_mean_rate() -> None:
    offsets = arrival_offsets(201, 10.0, 1.0, np.random.default_rng(1))
    assert offsets[0] == 0.0
    assert offsets[-1] == pytest.approx(20.0)  # 200 gaps of exactly 1 / rate on average
    assert np.all(np.diff(offsets) > 0)
    np.testing.assert_array_equal(offsets, arrival_offsets(201, 10.0, 1.0, np.random.default_rng(1)))


def test_burstiness_controls_the_spread_of_gaps() -> None:
    def gap_cv(burstiness: float) -> float:
        gaps = np.diff(arrival_offsets(4001, 50.0, burstiness, np.random.default_rng(2)))
        return float(gaps.std() / gaps.mean())

    # Gamma gaps with shape k have a coefficient of variation of 1 / sqrt(k).
    assert gap_cv(0.25) == pytest.approx(2.0, rel=0.15)
    assert gap_cv(1.0) == pytest.approx(1.0, rel=0.1)
    assert gap_cv(4.0) == pytest.approx(0.5, rel=0.1)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"request_rate": 0.0}, "request-rate"),
        ({"burstiness": 0.0}, "burstiness"),
        ({"max_concurrency": 0}, "max-concurrency"),
        ({"num_warmups": -1}, "num-warmups"),
        ({"request_timeout_s": 0.0}, "request-timeout"),
    ],
)
def test_load_config_is_validated(fields: dict, message: str) -> None:
    with pytest.raises(BenchmarkError, match=message):
        LoadConfig(**fields)


def test_concurrency_cap_and_warmups(server) -> None:
    samples = [SampleRequest(f"w{i}", 1, 3 + i % 4) for i in range(9)]
    run = _run(server, samples, max_concurrency=2, num_warmups=3)
    assert server.peak_in_flight == 2
    assert len(server.payloads) == 1 + 3 + 9  # probe, warm-ups, measured requests
    assert [o.output_tokens for o in run.outputs] == [s.expected_output_len for s in samples]
    assert all(o.success for o in run.outputs)
    assert run.duration_s >= max(o.start_time + o.latency for o in run.outputs)


def test_request_rate_spaces_the_requests(server) -> None:
    run = _run(server, [SampleRequest("w1", 1, 1) for _ in range(5)], request_rate=50.0, seed=3)
    starts = [o.start_time for o in run.outputs]
    expected = arrival_offsets(5, 50.0, 1.0, np.random.default_rng(3))
    # never before its arrival time; how late depends on the machine's load (a 0.37 s stall seen in a loaded CI)
    assert all(start >= arrival - 0.005 for start, arrival in zip(starts, expected)), (starts, expected)
    assert starts[0] < 0.02 and run.duration_s >= expected[-1]


def test_failed_probe_stops_the_run_with_the_server_error(server) -> None:
    with pytest.raises(BenchmarkError, match="probe request .* failed: HTTP 404: model typo-model not found"):
        _run(server, [SampleRequest("w1", 1, 2)], model="typo-model")
    assert len(server.payloads) == 1
