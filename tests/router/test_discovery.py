"""Service discovery: dns:/// addresses re-resolved while requests run (a Kubernetes headless Service scaling
up and down, simulated with an injected resolver), fixed addresses untouched, the decode's advertised KV address."""
from __future__ import annotations

import asyncio
import contextlib

import pytest

from router.config import RouterConfig
from router.discovery import Target, parse_target, resolve_with_system
from router.instances import Role
from tests.router.fake_instances import FakeDecode, FakePrefill, Running, serve
from tests.router.harness import eventually, run_router, script

pytestmark = pytest.mark.anyio

TEXT = " the cat sat on the mat."
DECODE_NAME = "hack-decode-headless"


class FakeDNS:
    """What the decode Service's name resolves to; tests change it to scale the Service."""

    def __init__(self) -> None:
        self.endpoints: list[tuple[str, int]] = []
        self.failing = False
        self.lookups = 0

    def point_at(self, servers: list[Running]) -> None:
        self.endpoints = [(host, int(port)) for host, port in (s.address.rsplit(":", 1) for s in servers)]

    async def resolve(self, host: str, port: int) -> list[tuple[str, int]]:
        assert host == DECODE_NAME and port == 50061
        self.lookups += 1
        if self.failing:
            raise OSError("Temporary failure in name resolution")
        return list(self.endpoints)


@pytest.mark.parametrize("text, expected", [
    ("dns:///hack-decode-headless:50061", Target("hack-decode-headless", 50061, True)),
    ("dns:hack-decode-headless.ns.svc.cluster.local:50061",
     Target("hack-decode-headless.ns.svc.cluster.local", 50061, True)),
    ("10.0.0.7:50061", Target("10.0.0.7", 50061, False)),
    ("[fd00::7]:50061", Target("fd00::7", 50061, False)),
])
def test_targets_parse(text, expected):
    assert parse_target(text, "decode") == expected


@pytest.mark.parametrize("text", ["dns:///no-port", "dns:///:50061", "dns:///name:0", "name", "name:http"])
def test_bad_targets_are_named(text):
    with pytest.raises(ValueError, match=f"decode address '{text}'"):
        RouterConfig(model="m", prefill_addresses=("p:1",), decode_addresses=(text,))


def test_discovery_interval_must_be_positive():
    with pytest.raises(ValueError, match="discovery_interval_s"):
        RouterConfig(model="m", prefill_addresses=("p:1",), decode_addresses=("d:1",), discovery_interval_s=0)


async def test_the_system_resolver_answers_for_localhost():
    assert ("127.0.0.1", 50061) in await resolve_with_system("localhost", 50061)


@contextlib.asynccontextmanager
async def dns_router(byte_model, prefill: FakePrefill, dns: FakeDNS, **config: object):
    async with serve(prefill) as prefill_server:
        settings = dict(model=str(byte_model), prefill_addresses=(prefill_server.address,),
                        decode_addresses=(f"dns:///{DECODE_NAME}:50061",), served_model_name="byte-model",
                        health_interval_s=60.0, rpc_timeout_s=1.0, discovery_interval_s=0.05)
        async with run_router(RouterConfig(**(settings | config)), resolver=dns.resolve) as (url, app):
            yield url, app


def decode_addresses(app) -> list[str]:
    return sorted(instance.address for instance in app.state.pool.of_role(Role.DECODE))


async def test_scaling_decode_up_and_down_through_dns_fails_no_request(byte_model, byte_tokenizer):
    import httpx

    first, rest = script(byte_tokenizer, TEXT)
    decodes = [FakeDecode(rest, token_delay_s=0.01) for _ in range(3)]
    dns = FakeDNS()
    async with contextlib.AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(serve(decode)) for decode in decodes]
        dns.point_at(servers[:1])
        url, app = await stack.enter_async_context(dns_router(byte_model, FakePrefill(first), dns))
        client = await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=20.0))
        assert decode_addresses(app) == [servers[0].address]

        statuses: list[tuple[int, str]] = []
        stop = asyncio.Event()

        async def user() -> None:
            for _ in range(200):  # bounded
                if stop.is_set():
                    return
                response = await client.post("/v1/completions", json={"model": "byte-model", "prompt": "Once",
                                                                       "max_tokens": 50})
                statuses.append((response.status_code, response.json()["choices"][0]["text"]
                                 if response.status_code == 200 else response.text))

        users = [asyncio.create_task(user()) for _ in range(6)]

        async def scale_to(indices: list[int]) -> None:
            dns.point_at([servers[i] for i in indices])
            wanted = sorted(servers[i].address for i in indices)
            await eventually(lambda: decode_addresses(app) == wanted)
            served = [len(decodes[i].generate_requests) for i in indices]
            await eventually(lambda: all(len(decodes[i].generate_requests) > n for i, n in zip(indices, served)),
                             timeout_s=10.0)  # every instance in the set takes new requests

        await scale_to([0, 1, 2])  # scale up
        await scale_to([2])  # scale down while 0 and 1 have requests in flight
        before = [len(decode.generate_requests) for decode in decodes]
        await asyncio.sleep(0.3)
        assert [len(d.generate_requests) for d in decodes[:2]] == before[:2]  # gone instances get nothing new
        await scale_to([1, 2])  # an address coming back
        stop.set()
        await asyncio.gather(*users)

    failures = [status for status in statuses if status != (200, TEXT)]
    assert len(statuses) >= 12 and failures == []
    assert all(decode.generate_requests for decode in decodes)


async def test_a_removed_instance_closes_once_its_requests_end(byte_model, byte_tokenizer):
    import httpx

    first, rest = script(byte_tokenizer, TEXT)
    slow, other = FakeDecode(rest, token_delay_s=0.05), FakeDecode(rest)
    dns = FakeDNS()
    async with contextlib.AsyncExitStack() as stack:
        slow_server = await stack.enter_async_context(serve(slow))
        other_server = await stack.enter_async_context(serve(other))
        dns.point_at([slow_server])
        url, app = await stack.enter_async_context(dns_router(byte_model, FakePrefill(first), dns))
        client = await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=20.0))
        request = asyncio.create_task(client.post("/v1/completions", json={"model": "byte-model",
                                                                            "prompt": "Once", "max_tokens": 50}))
        await eventually(lambda: slow.generate_requests)
        dns.point_at([other_server])  # the pod terminates: out of DNS, still draining its request
        await eventually(lambda: decode_addresses(app) == [other_server.address])
        retired = app.state.pool._retiring
        assert [instance.address for instance in retired] == [slow_server.address]
        response = await request
        assert response.status_code == 200 and response.json()["choices"][0]["text"] == TEXT
        await eventually(lambda: not app.state.pool._retiring)  # closed once idle


async def test_dns_failure_keeps_the_known_instances(byte_model, byte_tokenizer):
    import httpx

    first, rest = script(byte_tokenizer, TEXT)
    dns = FakeDNS()
    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(serve(FakeDecode(rest)))
        dns.point_at([server])
        url, app = await stack.enter_async_context(dns_router(byte_model, FakePrefill(first), dns))
        dns.failing = True
        lookups = dns.lookups
        await eventually(lambda: dns.lookups > lookups + 2)
        assert decode_addresses(app) == [server.address]
        async with httpx.AsyncClient(base_url=url, timeout=20.0) as client:
            response = await client.post("/v1/completions", json={"model": "byte-model", "prompt": "Once"})
            ready = (await client.get("/ready")).json()
        assert response.status_code == 200 and ready["ready"]


async def test_a_name_resolving_to_nothing_leaves_the_router_not_ready(byte_model):
    import httpx

    async with dns_router(byte_model, FakePrefill(0), FakeDNS()) as (url, app):
        async with httpx.AsyncClient(base_url=url, timeout=20.0) as client:
            ready = await client.get("/ready")
            response = await client.post("/v1/completions", json={"model": "byte-model", "prompt": "Once"})
    assert ready.status_code == 503 and decode_addresses(app) == []
    assert response.status_code == 503 and "decode" in response.json()["error"]["message"]


async def test_prefill_pushes_kv_to_the_address_the_decode_advertises(byte_model, byte_tokenizer):
    import httpx

    first, rest = script(byte_tokenizer, TEXT)
    decode, prefill, dns = FakeDecode(rest), FakePrefill(first), FakeDNS()
    async with serve(decode) as server:
        decode.kv_address = server.address.replace("127.0.0.1", "localhost")
        dns.point_at([server])
        async with dns_router(byte_model, prefill, dns) as (url, _):
            async with httpx.AsyncClient(base_url=url, timeout=20.0) as client:
                response = await client.post("/v1/completions", json={"model": "byte-model", "prompt": "Once"})
    assert response.status_code == 200
    assert prefill.requests[0].decode_address == decode.kv_address
