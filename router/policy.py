"""How the router picks one prefill and one decode instance for a request.

- `round_robin`: the healthy instances of a role in turn.
- `least_loaded`: prefill: the shortest queue; decode: the most free KV blocks. Both read the last Stats
  snapshot (polled with the health checks) corrected by what this router dispatched since, so a burst
  between two polls does not all land on the instance that looked idlest. Ties go to fewer in-flight requests.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Protocol

from router.instances import Instance, Role

POLICIES: tuple[str, ...] = ("round_robin", "least_loaded")


class SelectionPolicy(Protocol):
    def choose(self, candidates: Sequence[Instance]) -> Instance:
        """Pick one of `candidates` (healthy, non-empty, in a stable order)."""


class RoundRobin:
    def __init__(self) -> None:
        self._turn = {role: itertools.count() for role in Role}

    def choose(self, candidates: Sequence[Instance]) -> Instance:
        return candidates[next(self._turn[candidates[0].role]) % len(candidates)]


class LeastLoaded:
    def choose(self, candidates: Sequence[Instance]) -> Instance:
        return min(candidates, key=load_key)


def load_key(instance: Instance) -> tuple[int, int]:
    """Smaller is less loaded."""
    stats = instance.stats
    if instance.role is Role.PREFILL:
        queued = (stats.prefill_queue_len if stats else 0) + instance.dispatched_since_poll
        return queued, instance.inflight
    free_blocks = (stats.free_kv_blocks if stats else 0) - instance.dispatched_since_poll
    return -free_blocks, instance.inflight


def make_policy(name: str) -> SelectionPolicy:
    if name == "round_robin":
        return RoundRobin()
    if name == "least_loaded":
        return LeastLoaded()
    raise ValueError(f"unknown policy {name!r}; expected one of {POLICIES}")
