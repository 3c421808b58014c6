"""Instance selection: round robin, least loaded (Stats snapshot + what was dispatched since), pool.pick."""
from __future__ import annotations

import pytest

from proto import hack_pb2
from router.errors import RouterError
from router.instances import Instance, InstancePool, Role
from router.policy import LeastLoaded, RoundRobin, load_key, make_policy


def instance(role: Role, address: str, **fields: object) -> Instance:
    # Selection never touches the channel or stubs.
    return Instance(role, address, channel=None, stub=None, health_stub=None, healthy=True, **fields)


def decode(address: str, free_blocks: int, **fields: object) -> Instance:
    return instance(Role.DECODE, address, stats=hack_pb2.StatsResponse(free_kv_blocks=free_blocks), **fields)


def prefill(address: str, queue: int, **fields: object) -> Instance:
    return instance(Role.PREFILL, address, stats=hack_pb2.StatsResponse(prefill_queue_len=queue), **fields)


def test_round_robin_cycles_each_role_independently():
    policy = RoundRobin()
    decodes = [decode(f"d:{i}", 0) for i in range(3)]
    prefills = [prefill(f"p:{i}", 0) for i in range(2)]
    picks = [policy.choose(decodes).address for _ in range(4)]
    picks += [policy.choose(prefills).address for _ in range(3)]
    assert picks == ["d:0", "d:1", "d:2", "d:0", "p:0", "p:1", "p:0"]


def test_least_loaded_decode_prefers_free_blocks_then_fewer_inflight():
    policy = LeastLoaded()
    assert policy.choose([decode("a:1", 10), decode("b:1", 30), decode("c:1", 20)]).address == "b:1"
    tied = [decode("a:1", 30, inflight=4), decode("b:1", 30, inflight=1)]
    assert policy.choose(tied).address == "b:1"


def test_least_loaded_counts_what_was_dispatched_since_the_last_poll():
    policy = LeastLoaded()
    busy = decode("a:1", 50, dispatched_since_poll=45)  # 45 blocks reserved since its Stats were taken
    assert policy.choose([busy, decode("b:1", 20)]).address == "b:1"
    queued = prefill("p:1", 0, dispatched_since_poll=3)
    assert policy.choose([queued, prefill("p:2", 2)]).address == "p:2"
    assert load_key(prefill("p:3", 2, dispatched_since_poll=1, inflight=5)) == (3, 5)


def test_an_instance_without_stats_counts_as_full():
    policy = LeastLoaded()
    unknown = instance(Role.DECODE, "a:1")
    assert policy.choose([unknown, decode("b:1", 1)]).address == "b:1"


def test_make_policy_rejects_unknown_names():
    assert isinstance(make_policy("least_loaded"), LeastLoaded)
    with pytest.raises(ValueError, match="round_robin"):
        make_policy("random")


def pool_of(instances: list[Instance]) -> InstancePool:
    return InstancePool(instances, RoundRobin(), rpc_timeout_s=1.0, health_interval_s=1.0)


def test_pick_skips_unhealthy_and_excluded_instances():
    down = decode("a:1", 10)
    down.healthy = False
    excluded, chosen = decode("b:1", 10), decode("c:1", 10)
    pool = pool_of([down, excluded, chosen, prefill("p:1", 0)])
    assert [pool.pick(Role.DECODE, exclude=[excluded]).address for _ in range(2)] == ["c:1", "c:1"]
    assert pool.ready


def test_pick_without_candidates_is_a_503():
    pool = pool_of([decode("a:1", 10), prefill("p:1", 0)])
    pool.instances[1].healthy = False
    with pytest.raises(RouterError) as raised:
        pool.pick(Role.PREFILL)
    assert raised.value.status == 503 and raised.value.code == "no_healthy_instance"
    assert not pool.ready
