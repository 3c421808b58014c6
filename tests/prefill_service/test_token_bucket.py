"""The link emulation's token bucket: long-run rate, burst, debt for chunks larger than the bucket."""
from __future__ import annotations

import asyncio
import random
import time

import pytest

from prefill_service.token_bucket import TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_sending_n_bytes_takes_n_over_rate_after_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(bytes_per_s=1000.0, burst_bytes=100.0, clock=clock, sleep=clock.sleep)
    sizes = [random.randint(1, 400) for _ in range(37)]

    async def send_all():
        for size in sizes:
            await bucket.acquire(size)

    asyncio.run(send_all())
    assert clock.now - 100.0 == pytest.approx((sum(sizes) - 100) / 1000.0)


def test_an_idle_link_refills_up_to_the_burst_only() -> None:
    clock = FakeClock()
    bucket = TokenBucket(bytes_per_s=1000.0, burst_bytes=50.0, clock=clock, sleep=clock.sleep)

    async def scenario():
        await bucket.acquire(50)  # the full burst, no wait
        clock.now += 10.0  # idle for long: the bucket refills to 50, not 10_000
        await bucket.acquire(50)
        await bucket.acquire(30)

    asyncio.run(scenario())
    assert clock.slept == [pytest.approx(0.03)]


def test_real_time_rate_of_a_10_mbit_link() -> None:
    bucket = TokenBucket.for_link(gbps=0.01)  # 1.25 MB/s, 1.25 kB burst

    async def send():
        start = time.monotonic()
        for _ in range(20):
            await bucket.acquire(12_500)
        return time.monotonic() - start

    elapsed = asyncio.run(send())
    assert 0.19 <= elapsed < 0.5  # 250 kB at 1.25 MB/s = 0.2 s (minus the 1 ms burst)


@pytest.mark.parametrize("rate, burst", [(0.0, 1.0), (-5.0, 1.0), (1.0, 0.0)])
def test_bad_settings_are_refused(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        TokenBucket(rate, burst)


def test_negative_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        asyncio.run(TokenBucket(1.0, 1.0).acquire(-1))
