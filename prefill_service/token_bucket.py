"""A token bucket that paces the KV stream to emulate a network link of a given speed.

`--kv-link-gbps X` makes the prefill service send KV bytes no faster than X Gbit/s on average, like the rate
limiter of the paper's artifact: the loopback link of a single machine is otherwise far faster than the
10-50 Gbit/s links the paper studies, and the transfer time (what HACK shrinks) would vanish.

Tokens are bytes. The bucket holds at most `burst_bytes`; a chunk larger than what is in the bucket may be
taken anyway, leaving a debt that later chunks wait off, so the long-run rate is exact for any chunk size.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class TokenBucket:
    def __init__(
        self,
        bytes_per_s: float,
        burst_bytes: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if bytes_per_s <= 0:
            raise ValueError(f"the link rate must be > 0 bytes/s, got {bytes_per_s}")
        if burst_bytes <= 0:
            raise ValueError(f"the burst must be > 0 bytes, got {burst_bytes}")
        self.bytes_per_s = bytes_per_s
        self.burst_bytes = burst_bytes
        self._clock, self._sleep = clock, sleep
        self._level = burst_bytes  # starts full: an idle link can send a burst at once
        self._updated = clock()
        self._lock = asyncio.Lock()  # concurrent streams share one link, served in arrival order

    @staticmethod
    def for_link(gbps: float, burst_s: float = 0.001) -> "TokenBucket":
        """A bucket for a link of `gbps` Gbit/s that lets `burst_s` seconds' worth of bytes through at once."""
        bytes_per_s = gbps * 1e9 / 8
        return TokenBucket(bytes_per_s, burst_bytes=bytes_per_s * burst_s)

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self.burst_bytes, self._level + (now - self._updated) * self.bytes_per_s)
        self._updated = now

    async def acquire(self, num_bytes: int) -> None:
        """Wait until num_bytes may go on the link."""
        if num_bytes < 0:
            raise ValueError(f"cannot send a negative number of bytes ({num_bytes})")
        async with self._lock:
            self._refill()
            self._level -= num_bytes
            if self._level < 0:
                await self._sleep(-self._level / self.bytes_per_s)
                self._refill()
