"""Drives the load: request arrivals, concurrency limit, a probe request, warm-up, progress bar.

Arrivals follow vLLM: with `request_rate` finite, inter-arrival gaps are gamma distributed with shape
`burstiness` (1 = Poisson process; < 1 burstier; > 1 more regular) and mean 1 / rate; `inf` sends everything
at once. `max_concurrency` caps requests in flight on top of the arrival schedule.
"""

import asyncio
import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import numpy as np
from tqdm.auto import tqdm

from bench.hack_bench.client import EndpointConfig, send_request
from bench.hack_bench.records import BenchmarkError, RequestOutput, SampleRequest


@dataclass(frozen=True)
class LoadConfig:
    """How hard and how fast to push the server; validated on construction."""

    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    num_warmups: int = 0
    request_timeout_s: float = 3600.0
    seed: int = 0
    disable_tqdm: bool = False

    def __post_init__(self) -> None:
        if not self.request_rate > 0:
            raise BenchmarkError(f"--request-rate must be > 0 (inf sends all at once), got {self.request_rate}")
        if not 0 < self.burstiness < math.inf:
            raise BenchmarkError(f"--burstiness must be a positive number, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise BenchmarkError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if self.num_warmups < 0:
            raise BenchmarkError(f"--num-warmups must be >= 0, got {self.num_warmups}")
        if not self.request_timeout_s > 0:
            raise BenchmarkError(f"--request-timeout must be > 0, got {self.request_timeout_s}")


@dataclass(frozen=True)
class BenchmarkRun:
    outputs: list[RequestOutput]
    duration_s: float


def arrival_offsets(count: int, request_rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Send times in seconds from the start: first at 0, gamma gaps rescaled to a mean of exactly 1 / rate.

    The rescaling (as in vLLM) removes the sampling noise of the total span, so throughput numbers do not
    drift with the seed.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if math.isinf(request_rate) or count == 1:
        return np.zeros(count)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=count - 1)
    gaps *= (count - 1) / request_rate / gaps.sum()
    return np.concatenate([[0.0], np.cumsum(gaps)])


def make_http_client(load: LoadConfig) -> httpx.AsyncClient:
    """One pooled client for the whole run, with as many connections as requests may be in flight."""
    limits = httpx.Limits(max_connections=load.max_concurrency, max_keepalive_connections=load.max_concurrency)
    return httpx.AsyncClient(timeout=httpx.Timeout(load.request_timeout_s), limits=limits)


def concurrency_limit(load: LoadConfig) -> asyncio.Semaphore | contextlib.nullcontext:
    return asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else contextlib.nullcontext()


async def run_benchmark(
    client: httpx.AsyncClient, endpoint: EndpointConfig, samples: Sequence[SampleRequest], load: LoadConfig
) -> BenchmarkRun:
    """Probe the endpoint, warm it up, then send every sample on schedule and wait for all answers."""
    if not samples:
        raise BenchmarkError("no request to send")
    await probe(client, endpoint, samples[0])
    limit = concurrency_limit(load)
    await warm_up(client, endpoint, samples, load, limit)
    return await send_all(client, endpoint, samples, load, limit)


async def send_all(
    client: httpx.AsyncClient,
    endpoint: EndpointConfig,
    samples: Sequence[SampleRequest],
    load: LoadConfig,
    limit: asyncio.Semaphore | contextlib.nullcontext | None = None,
) -> BenchmarkRun:
    """The timed part of a run, without probe or warm-up: every sample on schedule, under the concurrency cap."""
    limit = limit if limit is not None else concurrency_limit(load)
    offsets = arrival_offsets(len(samples), load.request_rate, load.burstiness, np.random.default_rng(load.seed))
    with tqdm(total=len(samples), disable=load.disable_tqdm, desc="requests", unit="req") as progress:
        origin = time.perf_counter()
        outputs = await _send_on_schedule(client, endpoint, samples, offsets, limit, progress, origin)
        duration_s = time.perf_counter() - origin
    return BenchmarkRun(outputs, duration_s)


async def probe(client: httpx.AsyncClient, endpoint: EndpointConfig, sample: SampleRequest) -> None:
    """One request before the run, so a misconfigured benchmark stops with the server's own error."""
    output = await send_request(client, endpoint, sample, clock_origin=time.perf_counter())
    if not output.success:
        raise BenchmarkError(f"probe request to {endpoint.api_url} failed: {output.error}")


async def warm_up(
    client: httpx.AsyncClient,
    endpoint: EndpointConfig,
    samples: Sequence[SampleRequest],
    load: LoadConfig,
    limit: asyncio.Semaphore | contextlib.nullcontext,
) -> None:
    """`num_warmups` untimed requests (cycling over the samples), sent at once under the concurrency cap."""
    if load.num_warmups == 0:
        return
    warmups = [samples[i % len(samples)] for i in range(load.num_warmups)]
    with tqdm(total=len(warmups), disable=load.disable_tqdm, desc="warm-up", unit="req") as progress:
        origin = time.perf_counter()
        await asyncio.gather(*(_send_limited(client, endpoint, s, limit, progress, origin) for s in warmups))


async def _send_on_schedule(
    client: httpx.AsyncClient,
    endpoint: EndpointConfig,
    samples: Sequence[SampleRequest],
    offsets: np.ndarray,
    limit: asyncio.Semaphore | contextlib.nullcontext,
    progress: tqdm,
    origin: float,
) -> list[RequestOutput]:
    tasks = []
    for sample, offset in zip(samples, offsets.tolist()):
        delay = origin + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_send_limited(client, endpoint, sample, limit, progress, origin)))
    return list(await asyncio.gather(*tasks))


async def _send_limited(
    client: httpx.AsyncClient,
    endpoint: EndpointConfig,
    sample: SampleRequest,
    limit: asyncio.Semaphore | contextlib.nullcontext,
    progress: tqdm,
    origin: float,
) -> RequestOutput:
    async with limit:
        output = await send_request(client, endpoint, sample, origin)
    progress.update(1)
    return output
