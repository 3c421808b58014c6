"""Chaos: real `hack-cluster` processes (2 prefill + 2 decode, tiny random model, supervised) under 16 concurrent
streams while instances are killed with SIGKILL or drained with SIGTERM.

With a spare instance of the killed role no request fails and every output equals the undisturbed run's (decode
kills migrate requests, prefill kills retry them); with no spare, clients get explicit error events and the
service is back within 5 s of the restarted instance listening. Every scenario ends with empty decode pools.
The cluster runs with HACK_INTERNAL_TOKEN set, so the token path is exercised end to end too.
"""
from __future__ import annotations

import asyncio
import json
import signal
import time
from dataclasses import dataclass

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.cluster import Cluster, ClusterConfig, Process
from common.random_models import RandomModelSpec
from proto import hack_pb2, hack_pb2_grpc

pytestmark = pytest.mark.slow

TOKEN = "chaos-internal-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
NUM_STREAMS = 16
MAX_TOKENS = 160
SPEC = RandomModelSpec(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=16, max_position_embeddings=512, seed=5)


@pytest.fixture(scope="module")
def cluster(random_checkpoint):
    config = ClusterConfig(
        str(random_checkpoint(SPEC)), num_prefill=2, num_decode=2, kv_mode="fp16", port=0,
        # a slow emulated KV link keeps prefills in flight long enough to be killed mid-push
        prefill_args=("--kv-link-gbps", "0.002"),
        decode_args=("--kv-memory-mb", "16", "--drain-timeout", "20"),
        router_args=("--health-interval", "0.3", "--token-timeout", "10"),
        restart_backoff_s=0.2, stable_after_s=2.0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HACK_INTERNAL_TOKEN", TOKEN)
        patch.setenv("OMP_NUM_THREADS", "1")
        with Cluster(config, supervise=True) as running:
            yield running


@dataclass
class Outcome:
    status: int
    text: str
    error: dict | None
    tokens: int  # text chunks received


def bodies(cluster: Cluster) -> list[dict]:
    """16 requests: different prompts, half greedy, half seeded sampling."""
    result = []
    for i in range(NUM_STREAMS):
        body = {"model": cluster.config.served_model_name, "prompt": f"Story {i}: once upon a time " + "ab" * i,
                "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True, "temperature": 0.0}
        if i % 2:
            body.update(temperature=0.8, top_p=0.95, seed=1000 + i)
        result.append(body)
    return result


async def stream(client: httpx.AsyncClient, body: dict, outcome: Outcome) -> None:
    async with client.stream("POST", "/v1/completions", json=body) as response:
        outcome.status = response.status_code
        if response.status_code != 200:
            outcome.error = json.loads(await response.aread())["error"]
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                outcome.error = event["error"]
            else:
                outcome.text += event["choices"][0]["text"]
                outcome.tokens += 1


async def run_streams(cluster: Cluster, disturb=None) -> list[Outcome]:
    """The 16 streams at once; `disturb(outcomes)` runs alongside them."""
    outcomes = [Outcome(0, "", None, 0) for _ in range(NUM_STREAMS)]
    async with httpx.AsyncClient(base_url=cluster.url, timeout=120) as client:
        tasks = [asyncio.ensure_future(stream(client, body, outcome))
                 for body, outcome in zip(bodies(cluster), outcomes)]
        if disturb is not None:
            await disturb(outcomes)
        await asyncio.gather(*tasks)
    return outcomes


def stub_call(address: str, method: str, request) -> object:
    with grpc.insecure_channel(address) as channel:
        stub = hack_pb2_grpc.DecodeServiceStub(channel)
        return getattr(stub, method)(request, metadata=AUTH, timeout=2.0)


def used_blocks(cluster: Cluster, timeout_s: float = 3.0) -> list[int]:
    """Used KV blocks of every decode instance, polled until all are 0 or timeout_s passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        used = [stub_call(p.address, "Stats", hack_pb2.StatsRequest()).used_kv_blocks
                for p in cluster.by_role("decode")]
        if not any(used) or time.monotonic() > deadline:
            return used
        time.sleep(0.05)


def serving(address: str) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def wait_until(condition, timeout_s: float, what: str) -> float:
    """Seconds until condition() held; fails after timeout_s."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"{what} did not happen within {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - start


def wait_all_healthy(cluster: Cluster, timeout_s: float = 90.0) -> None:
    def healthy() -> bool:
        try:
            ready = httpx.get(f"{cluster.url}/ready", timeout=2).json()
        except httpx.HTTPError:
            return False
        return all(i["healthy"] for i in ready["instances"])
    wait_until(healthy, timeout_s, "every instance healthy again")


async def when_streaming(outcomes: list[Outcome], min_tokens: int = 3) -> None:
    """Until every stream has some tokens and none has finished: the moment to break something."""
    while not all(o.tokens >= min_tokens for o in outcomes):
        await asyncio.sleep(0.005)


def kill(process: Process) -> None:
    process.popen.send_signal(signal.SIGKILL)


@pytest.fixture(scope="module")
def undisturbed(cluster) -> list[Outcome]:
    outcomes = asyncio.run(run_streams(cluster))
    assert [(o.status, o.error) for o in outcomes] == [(200, None)] * NUM_STREAMS
    assert all(o.tokens > 0 for o in outcomes)
    assert used_blocks(cluster) == [0, 0]
    return outcomes


def metric(cluster: Cluster, name: str) -> float:
    for line in httpx.get(f"{cluster.url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def test_killing_a_decode_instance_loses_no_request(cluster, undisturbed) -> None:
    victim = cluster.by_role("decode")[0]
    pid = victim.popen.pid
    migrations_before = metric(cluster, "hack_router_migrations_total")

    async def kill_decode(outcomes: list[Outcome]) -> None:
        await when_streaming(outcomes)
        kill(victim)

    outcomes = asyncio.run(run_streams(cluster, kill_decode))
    assert [o.error for o in outcomes] == [None] * NUM_STREAMS
    assert [o.text for o in outcomes] == [o.text for o in undisturbed]  # greedy and seeded alike
    assert metric(cluster, "hack_router_migrations_total") > migrations_before
    wait_until(lambda: victim.popen.pid != pid and serving(victim.address), 90, "the decode restart")
    wait_all_healthy(cluster)
    assert used_blocks(cluster) == [0, 0]


def test_killing_a_prefill_instance_mid_prefill_loses_no_request(cluster, undisturbed) -> None:
    victim = cluster.by_role("prefill")[0]
    pid = victim.popen.pid

    async def kill_prefill(outcomes: list[Outcome]) -> None:
        def busy() -> bool:
            with grpc.insecure_channel(victim.address) as channel:
                stats = hack_pb2_grpc.PrefillServiceStub(channel).Stats(hack_pb2.StatsRequest(), metadata=AUTH,
                                                                         timeout=2.0)
            return stats.prefill_queue_len >= 2
        while not await asyncio.to_thread(busy):
            await asyncio.sleep(0.005)
        kill(victim)

    outcomes = asyncio.run(run_streams(cluster, kill_prefill))
    assert [o.error for o in outcomes] == [None] * NUM_STREAMS
    assert [o.text for o in outcomes] == [o.text for o in undisturbed]
    wait_until(lambda: victim.popen.pid != pid and serving(victim.address), 90, "the prefill restart")
    wait_all_healthy(cluster)
    assert used_blocks(cluster) == [0, 0]


def test_a_drained_decode_instance_finishes_its_streams_then_exits(cluster, undisturbed) -> None:
    victim = cluster.by_role("decode")[1]
    pid = victim.popen.pid
    exit_codes: list[int] = []

    async def drain(outcomes: list[Outcome]) -> None:
        await when_streaming(outcomes)
        popen = victim.popen
        popen.send_signal(signal.SIGTERM)
        exit_codes.append(await asyncio.to_thread(popen.wait, 60))

    outcomes = asyncio.run(run_streams(cluster, drain))
    assert [o.error for o in outcomes] == [None] * NUM_STREAMS
    assert [o.text for o in outcomes] == [o.text for o in undisturbed]  # nothing was cut or moved
    assert exit_codes == [0]
    wait_until(lambda: victim.popen.pid != pid and serving(victim.address), 90, "the decode restart")
    wait_all_healthy(cluster)
    assert used_blocks(cluster) == [0, 0]


def test_with_no_spare_instance_clients_get_errors_and_service_returns(cluster) -> None:
    """Last: both decode instances die at once. Streams end with error events; once the restarted instances
    listen, the router serves again within 5 s."""
    victims = cluster.by_role("decode")
    pids = [v.popen.pid for v in victims]

    async def kill_both(outcomes: list[Outcome]) -> None:
        await when_streaming(outcomes)
        for victim in victims:
            kill(victim)

    outcomes = asyncio.run(run_streams(cluster, kill_both))
    assert all(o.status == 200 and o.error is not None for o in outcomes)  # explicit, never a silent cut
    assert all(o.error["type"] == "server_error" for o in outcomes)
    wait_until(lambda: all(v.popen.pid not in pids and serving(v.address) for v in victims), 120,
               "both decode restarts")
    body = {"model": cluster.config.served_model_name, "prompt": "Back?", "max_tokens": 4}

    def served() -> bool:
        try:
            return httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=10).status_code == 200
        except httpx.HTTPError:
            return False
    assert wait_until(served, 5.0, "service back after the restart") < 5.0
    assert used_blocks(cluster) == [0, 0]
