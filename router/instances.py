"""The prefill and decode instances behind the router: one gRPC channel each, with health and load.

An instance is healthy once its health check answers SERVING and its Stats call succeeds; the poll loop
repeats both every `health_interval_s`. An RPC that fails with UNAVAILABLE marks the instance unhealthy at
once (`report_failure`), so new requests avoid it until a later poll finds it back.
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
from proto import DECODE_SERVICE_NAME, PREFILL_SERVICE_NAME, hack_pb2, hack_pb2_grpc
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
    def service_name(self) -> str:
        return PREFILL_SERVICE_NAME if self.role is Role.PREFILL else DECODE_SERVICE_NAME


class InstancePool:
    def __init__(
        self, instances: list[Instance], policy: "SelectionPolicy", rpc_timeout_s: float, health_interval_s: float
    ) -> None:
        self.instances = instances
        self._policy = policy
        self._rpc_timeout_s = rpc_timeout_s
        self._health_interval_s = health_interval_s
        self._poll_task: asyncio.Task[None] | None = None

    @classmethod
    def connect(
        cls,
        prefill_addresses: Iterable[str],
        decode_addresses: Iterable[str],
        policy: "SelectionPolicy",
        rpc_timeout_s: float,
        health_interval_s: float,
        security: TransportSecurity | None = None,
    ) -> "InstancePool":
        """A pool with one (lazily connected) channel per address; call from inside the serving event loop."""
        instances = [Instance.connect(Role.PREFILL, address, security) for address in prefill_addresses]
        instances += [Instance.connect(Role.DECODE, address, security) for address in decode_addresses]
        return cls(instances, policy, rpc_timeout_s, health_interval_s)

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
        """Poll every instance once (so /ready is right from the start), then keep polling in the background."""
        await self.poll_once()
        self._poll_task = asyncio.create_task(self._poll_forever(), name="instance-poll")

    async def close(self) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
        await asyncio.gather(*(instance.channel.close() for instance in self.instances))

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
