"""Where the router finds its instances: fixed `host:port` addresses, or DNS names that resolve to several.

A target `dns:///NAME:PORT` (gRPC's naming; `dns:NAME:PORT` works too) stands for every address NAME resolves
to, as a Kubernetes headless Service does with one A record per ready pod. The pool re-resolves it every
discovery interval: a new address becomes an instance (in rotation once its health check passes), an address
that is gone leaves rotation at once and its channel closes when its last request ends.
"""
from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from common.addresses import join_host_port

DNS_SCHEME = "dns:"

# (host, port) -> the (ip, port) endpoints the name stands for now; OSError when it cannot be resolved.
Resolver = Callable[[str, int], Awaitable[list[tuple[str, int]]]]


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    dynamic: bool  # a DNS name to re-resolve, not one fixed address

    @property
    def address(self) -> str:
        return join_host_port(self.host, self.port)

    def __str__(self) -> str:
        return f"dns:///{self.address}" if self.dynamic else self.address


def parse_target(text: str, role: str) -> Target:
    """`host:port`, `[v6]:port`, `dns:///name:port` or `dns:name:port`; ValueError naming the problem."""
    dynamic = text.startswith(DNS_SCHEME)
    rest = text[len(DNS_SCHEME):].removeprefix("//").removeprefix("/") if dynamic else text
    host, sep, port = rest.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        form = "dns:///name:port" if dynamic else "host:port"
        raise ValueError(f"{role} address {text!r} is not {form}")
    return Target(host, int(port), dynamic)


async def resolve_with_system(host: str, port: int) -> list[tuple[str, int]]:
    """Every address of `host` (A and AAAA records, /etc/hosts) with `port`, as the system resolver answers."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({(info[4][0], port) for info in infos})
