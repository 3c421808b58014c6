"""The prefill and decode instances behind the router: one gRPC channel each, with health and load.

An instance is healthy once its health check answers SERVING and its Stats call succeeds; the poll loop
repeats both every `health_interval_s`. An RPC that fails with UNAVAILABLE marks the instance unhealthy at
once (`report_failure`), so new requests avoid it until a later poll finds it back.

Addresses may also be DNS names (router/discovery.py): the discovery loop re-resolves them every
`discovery_interval_s`, adds an instance per new address (in rotation once a poll finds it healthy) and takes
out the instances whose address is gone; those close their channel once their last request has ended, so
scaling down fails no request.
"""
from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.grpc_security import TransportSecurity
from common.addresses import join_host_port
from proto import DECODE_SERVICE_NAME, PREFILL_SERVICE_NAME, hack_pb2, hack_pb2_grpc
from router.discovery import Resolver, Target, parse_target, resolve_with_system
from router.errors import no_healthy_instance

if TYPE_CHECKING:
    from router.policy import SelectionPolicy

logger = logging.getLogger(__name__)

# Reconnect quickly after an instance restarts (gRPC's default backoff grows to two minutes).
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


class Role(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(eq=False)
class Instance:
    role: Role
    address: str
    channel: grpc.aio.Channel
    stub: hack_pb2_grpc.PrefillServiceStub | hack_pb2_grpc.DecodeServiceStub
    health_stub: health_pb2_grpc.HealthStub
    healthy: bool = False
    stats: hack_pb2.StatsResponse | None = None  # last successful poll
    inflight: int = 0  # requests this router has open on the instance
    dispatched_since_poll: int = 0  # prefills (prefill role) or reserved KV blocks (decode role) since `stats`
    failures: int = 0  # RPCs that failed with UNAVAILABLE

    @classmethod
    def connect(cls, role: Role, address: str, security: TransportSecurity | None = None) -> "Instance":
        """Create the channel (lazily connected; internal token and TLS per `security`); call from inside the
        event loop that will use it."""
        channel = (security or TransportSecurity()).channel(address, options=_CHANNEL_OPTIONS)
        stub_type = hack_pb2_grpc.PrefillServiceStub if role is Role.PREFILL else hack_pb2_grpc.DecodeServiceStub
        return cls(role, address, channel, stub_type(channel), health_pb2_grpc.HealthStub(channel))

    @property
    def kv_address(self) -> str:
        """Where prefill instances push this decode instance's KV: what it advertises, else the dialed address."""
        return (self.stats.kv_address if self.stats is not None else "") or self.address

    @property
    def service_name(self) -> str:
        return PREFILL_SERVICE_NAME if self.role is Role.PREFILL else DECODE_SERVICE_NAME


class InstancePool:
    def __init__(
        self,
        instances: list[Instance],
        policy: "SelectionPolicy",
        rpc_timeout_s: float,
        health_interval_s: float,
        *,
        dns_targets: Sequence[tuple[Role, Target]] = (),
        resolver: Resolver = resolve_with_system,
        discovery_interval_s: float = 5.0,
        security: TransportSecurity | None = None,
    ) -> None:
        self.instances = instances
        self._security = security
        self._policy = policy
        self._rpc_timeout_s = rpc_timeout_s
        self._health_interval_s = health_interval_s
        self._poll_task: asyncio.Task[None] | None = None
        # Discovery: the fixed instances stay whatever DNS says; each name keeps its last good resolution.
        self._fixed = {(i.role, i.address) for i in instances}
        self._dns_targets = list(dns_targets)
        self._resolver = resolver
        self._discovery_interval_s = discovery_interval_s
        self._resolved: dict[tuple[Role, Target], set[tuple[Role, str]]] = {}
        self._retiring: list[Instance] = []  # out of rotation, closed once their last request ends
        self._discovery_task: asyncio.Task[None] | None = None

    @classmethod
    def connect(
        cls,
        prefill_addresses: Iterable[str],
        decode_addresses: Iterable[str],
        policy: "SelectionPolicy",
        rpc_timeout_s: float,
        health_interval_s: float,
        security: TransportSecurity | None = None,
        *,
        resolver: Resolver = resolve_with_system,
        discovery_interval_s: float = 5.0,
    ) -> "InstancePool":
        """A pool with one (lazily connected) channel per fixed address, and the DNS targets (`dns:///name:port`)
        to resolve once started; call from inside the serving event loop. `security`: internal token and TLS."""
        targets = [(Role.PREFILL, parse_target(a, "prefill")) for a in prefill_addresses]
        targets += [(Role.DECODE, parse_target(a, "decode")) for a in decode_addresses]
        instances = [Instance.connect(role, target.address, security)
                     for role, target in targets if not target.dynamic]
        dns_targets = [(role, target) for role, target in targets if target.dynamic]
        return cls(instances, policy, rpc_timeout_s, health_interval_s, dns_targets=dns_targets, resolver=resolver,
                   discovery_interval_s=discovery_interval_s, security=security)

    def of_role(self, role: Role) -> list[Instance]:
        return [instance for instance in self.instances if instance.role is role]

    @property
    def ready(self) -> bool:
        """At least one healthy instance of each role."""
        return all(any(i.healthy for i in self.of_role(role)) for role in Role)

    def pick(self, role: Role, exclude: Sequence[Instance] = ()) -> Instance:
        """A healthy instance of `role` not in `exclude`, chosen by the policy (503 error when there is none)."""
        candidates = [i for i in self.of_role(role) if i.healthy and i not in exclude]
        if not candidates:
            raise no_healthy_instance(role.value)
        return self._policy.choose(candidates)

    @contextlib.contextmanager
    def track(self, instance: Instance) -> Iterator[None]:
        """Count a request as in flight on `instance` for the duration of the block."""
        instance.inflight += 1
        try:
            yield
        finally:
            instance.inflight -= 1

    def report_failure(self, instance: Instance, error: grpc.aio.AioRpcError) -> None:
        """Called for every failed RPC; UNAVAILABLE takes the instance out of rotation until it recovers."""
        if error.code() is not grpc.StatusCode.UNAVAILABLE:
            return
        instance.failures += 1
        if instance.healthy:
            logger.warning("%s %s is unavailable (%s); marked unhealthy", instance.role.value, instance.address,
                           error.details())
        instance.healthy = False

    async def start(self) -> None:
        """Resolve the DNS targets and poll every instance once (so /ready is right from the start), then keep
        doing both in the background."""
        await self.discover()
        await self.poll_once()
        self._poll_task = asyncio.create_task(self._poll_forever(), name="instance-poll")
        if self._dns_targets:
            self._discovery_task = asyncio.create_task(self._discover_forever(), name="instance-discovery")

    async def close(self) -> None:
        for task in (self._poll_task, self._discovery_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await asyncio.gather(*(instance.channel.close() for instance in [*self.instances, *self._retiring]))

    # ------------------------------------------------------------ discovery

    async def discover(self) -> None:
        """Re-resolve every DNS target: connect new addresses, retire the instances whose address is gone."""
        if not self._dns_targets:
            return
        resolved = await asyncio.gather(*(self._resolve(role, target) for role, target in self._dns_targets))
        wanted = set(self._fixed).union(*resolved)
        current = {(instance.role, instance.address) for instance in self.instances}
        added = [Instance.connect(role, address, self._security) for role, address in sorted(wanted - current)]
        gone = [instance for instance in self.instances if (instance.role, instance.address) not in wanted]
        for instance in gone:
            logger.info("%s %s is no longer in DNS; out of rotation (%d requests in flight)", instance.role.value,
                        instance.address, instance.inflight)
            instance.healthy = False
        self.instances = [instance for instance in self.instances if instance not in gone] + added
        self._retiring += gone
        for instance in added:
            logger.info("%s %s found in DNS", instance.role.value, instance.address)
        await asyncio.gather(*(self._poll(instance) for instance in added), self._close_idle_retired())

    async def _resolve(self, role: Role, target: Target) -> set[tuple[Role, str]]:
        """The (role, ip:port) of every address of `target`; its last good answer while DNS fails."""
        key = (role, target)
        try:
            endpoints = await asyncio.wait_for(self._resolver(target.host, target.port), self._rpc_timeout_s)
        except (OSError, asyncio.TimeoutError) as error:
            known = self._resolved.get(key, set())
            logger.warning("cannot resolve %s (%s); keeping its %d known instances", target, error or "timeout",
                           len(known))
            return known
        self._resolved[key] = {(role, join_host_port(ip, port)) for ip, port in endpoints}
        return self._resolved[key]

    async def _close_idle_retired(self) -> None:
        idle = [instance for instance in self._retiring if instance.inflight == 0]
        self._retiring = [instance for instance in self._retiring if instance.inflight > 0]
        # The grace lets a Cancel sent as a request ended go out.
        await asyncio.gather(*(instance.channel.close(grace=self._rpc_timeout_s) for instance in idle))

    async def _discover_forever(self) -> None:
        while True:
            await asyncio.sleep(self._discovery_interval_s)
            try:
                await self.discover()
            except Exception:  # a bug here must not end discovery for the router's whole life
                logger.exception("instance discovery failed; retrying in %g s", self._discovery_interval_s)

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(instance) for instance in self.instances))

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._health_interval_s)
            await self.poll_once()

    async def _poll(self, instance: Instance) -> None:
        try:
            # wait_for_ready: an instance that came back is found as soon as the channel reconnects, instead
            # of failing fast while the channel still sits in its reconnect backoff.
            health = await instance.health_stub.Check(
                health_pb2.HealthCheckRequest(service=instance.service_name),
                timeout=self._rpc_timeout_s,
                wait_for_ready=True,
            )
            stats = await instance.stub.Stats(hack_pb2.StatsRequest(), timeout=self._rpc_timeout_s)
        except grpc.aio.AioRpcError as error:
            self._set_health(instance, False, f"{error.code().name}: {error.details()}")
            return
        instance.stats = stats
        instance.dispatched_since_poll = 0
        serving = health.status == health_pb2.HealthCheckResponse.SERVING
        self._set_health(instance, serving, health_pb2.HealthCheckResponse.ServingStatus.Name(health.status))

    @staticmethod
    def _set_health(instance: Instance, healthy: bool, reason: str) -> None:
        if healthy != instance.healthy:
            logger.info("%s %s is now %s (%s)", instance.role.value, instance.address,
                        "healthy" if healthy else "unhealthy", reason)
        instance.healthy = healthy
