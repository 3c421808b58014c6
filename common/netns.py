"""The cluster across real network links: router, prefill and decode each in its own Linux network namespace.

    host ──veth── router ──veth── prefill
                    └────veth──── decode ──veth (shaped: tc tbf, + netem delay)── prefill

Every namespace pair that talks has its own veth pair and /30 (10.200.N.0/24, N the first index no host
interface uses). The prefill -> decode pair is shaped with `tc` (a token bucket filter at the link rate, plus
netem's delay where the kernel has it), so a request's KV crosses a real TCP connection over a link of that
speed, instead of the prefill process pacing its own stream (--kv-link-gbps, the fallback where there is no
root or no `ip`/`tc`). The decode instance advertises its address on that link (--advertise-host), the router
reaches each instance on its own link and the host reaches the router on the first one, so `NetnsCluster.url`
works from the calling process like `Cluster.url`. Every address lives in namespaces this module creates;
`destroy` removes them all (and with them every veth).
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

from common.cluster import Cluster, ClusterConfig, ClusterStartError, Process, child_environment, prepare_model

ROUTER_PORT, PREFILL_PORT, DECODE_PORT = 8000, 50051, 50061
SUBNET_BASE = ipaddress.ip_network("10.200.0.0/16")
# (name, left end, right end) of each link; "host" is the calling process's namespace.
LINKS = (("h", "host", "router"), ("p", "router", "prefill"), ("d", "router", "decode"), ("k", "prefill", "decode"))
KV_LINK = "k"


class NetnsError(RuntimeError):
    """An `ip` or `tc` command failed (the message has its output)."""


@dataclass(frozen=True)
class LinkShape:
    gbps: float  # prefill -> decode rate (both directions are shaped alike)
    delay_ms: float = 0.0  # one-way added latency (netem)

    def __post_init__(self) -> None:
        if not 0 < self.gbps <= 400:
            raise ValueError(f"link rate must be in (0, 400] Gbit/s, got {self.gbps}")
        if self.delay_ms < 0:
            raise ValueError(f"delay must be >= 0 ms, got {self.delay_ms}")

    def describe(self) -> str:
        return f"{self.gbps:g} Gbit/s" + (f" + {self.delay_ms:g} ms" if self.delay_ms else "")


def run(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise NetnsError(f"`{' '.join(command)}` failed: {(result.stderr or result.stdout).strip()}")
    return result.stdout


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be used here, or None when they can (root, ip, tc, veth and tbf work)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian: apt-get install iproute2)"
    name = f"hackprobe{os.getpid()}"
    try:
        run("ip", "netns", "add", name)
        try:
            run("ip", "-n", name, "link", "add", "name", "a", "type", "veth", "peer", "name", "b")
            run("tc", "-n", name, "qdisc", "add", "dev", "a", "root", "tbf", "rate", "1gbit", "burst", "128kb",
                "latency", "50ms")
        finally:
            run("ip", "netns", "del", name)
    except (NetnsError, OSError, subprocess.TimeoutExpired) as error:
        return f"network namespaces do not work here: {error}"
    return None


def netem_available() -> bool:
    """Whether the kernel has the netem qdisc (added latency); many container kernels do not."""
    name = f"hacknetem{os.getpid()}"
    try:
        run("ip", "netns", "add", name)
    except (NetnsError, OSError):
        return False
    try:
        run("ip", "-n", name, "link", "add", "name", "a", "type", "veth", "peer", "name", "b")
        run("tc", "-n", name, "qdisc", "add", "dev", "a", "root", "netem", "delay", "1ms")
        return True
    except NetnsError:
        return False
    finally:
        run("ip", "netns", "del", name)


class Netns:
    """The namespaces and links of one cluster; `create` builds them, `destroy` removes them (idempotent)."""

    def __init__(self, prefix: str) -> None:
        if not prefix.isalnum() or len(prefix) > 10:
            raise ValueError(f"namespace prefix must be alphanumeric, at most 10 characters, got {prefix!r}")
        self.prefix = prefix
        self.subnet: ipaddress.IPv4Network | None = None
        self.created: list[str] = []

    def namespace(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def address(self, link: str, end: str) -> str:
        """The IP of `end` ("host", "router", ...) on `link`."""
        assert self.subnet is not None
        index = [name for name, *_ in LINKS].index(link)
        left = [left for name, left, _ in LINKS if name == link][0]
        return str(self.subnet.network_address + 4 * index + (1 if end == left else 2))

    def create(self) -> None:
        self.subnet = _free_subnet()
        try:
            for role in ("router", "prefill", "decode"):
                run("ip", "netns", "add", self.namespace(role))
                self.created.append(self.namespace(role))
                run("ip", "-n", self.namespace(role), "link", "set", "lo", "up")
            for link, left, right in LINKS:
                self._connect(link, left, right)
        except BaseException:
            self.destroy()
            raise

    def _connect(self, link: str, left: str, right: str) -> None:
        ends = {left: f"{self.prefix}{link}0", right: f"{self.prefix}{link}1"}
        run("ip", "link", "add", "name", ends[left], "type", "veth", "peer", "name", ends[right])
        for end, device in ends.items():
            where = () if end == "host" else ("-n", self.namespace(end))
            if end != "host":
                run("ip", "link", "set", device, "netns", self.namespace(end))
            run("ip", *where, "addr", "add", f"{self.address(link, end)}/30", "dev", device)
            run("ip", *where, "link", "set", device, "up")

    def shape(self, shape: LinkShape) -> None:
        """Shape both directions of the prefill <-> decode link."""
        rate_bytes = shape.gbps * 1e9 / 8
        burst = max(128 * 1024, int(rate_bytes / 1000))  # at least one timer tick's worth (1 ms)
        for end, device in (("prefill", f"{self.prefix}{KV_LINK}0"), ("decode", f"{self.prefix}{KV_LINK}1")):
            tc = ("tc", "-n", self.namespace(end), "qdisc", "replace", "dev", device)
            tbf = ("tbf", "rate", f"{shape.gbps:g}gbit", "burst", str(burst), "latency", "100ms")
            if shape.delay_ms:
                run(*tc, "root", "handle", "1:", "netem", "delay", f"{shape.delay_ms:g}ms")
                run(*tc, "parent", "1:", "handle", "2:", *tbf)
            else:
                run(*tc, "root", *tbf)

    def destroy(self) -> None:
        for name in reversed(self.created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self.created.clear()
        # The host end of the host link goes with its peer; remove it too in case the peer never moved.
        subprocess.run(["ip", "link", "del", f"{self.prefix}h0"], capture_output=True, timeout=30)

    def exec_prefix(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(role)]


def _free_subnet() -> ipaddress.IPv4Network:
    """The first 10.200.N.0/24 that no interface of this host has an address in."""
    listing = run("ip", "-o", "-4", "addr", "show").split()
    used = [ipaddress.ip_interface(word).ip for previous, word in zip(listing, listing[1:]) if previous == "inet"]
    for subnet in SUBNET_BASE.subnets(new_prefix=24):
        if not any(address in subnet for address in used):
            return subnet
    raise NetnsError(f"every /24 of {SUBNET_BASE} is in use on this host")


class NetnsCluster(Cluster):
    """`Cluster`, with one prefill and one decode instance and the router each in its own namespace."""

    def __init__(self, config: ClusterConfig, shape: LinkShape, prefix: str | None = None, nice: int = 0) -> None:
        """`nice`: the instances' scheduling priority (-20..19; below 0 needs root, as namespaces do), so that a
        measurement of the link is not one of the neighbours' CPU load."""
        if config.num_prefill != 1 or config.num_decode != 1:
            raise ValueError("a namespace cluster has one prefill and one decode instance")
        if not -20 <= nice <= 19:
            raise ValueError(f"nice must be in -20..19, got {nice}")
        super().__init__(config)
        self.shape, self.nice = shape, nice
        self.net = Netns(prefix or f"hk{os.getpid() % 100000}")

    def start(self) -> None:
        cfg, net = self.config, self.net
        try:
            prepare_model(cfg.model)  # a GGUF or built-in model converted once, before any namespace exists
            net.create()
            net.shape(self.shape)
            common = ["--model", cfg.model, "--kv-mode", cfg.kv_mode, "--host", "0.0.0.0"]
            prefill = self._spawn_in("prefill", "prefill_service.main", PREFILL_PORT, "p",
                                     [*common, *cfg.prefill_args])
            decode = self._spawn_in("decode", "decode_service.main", DECODE_PORT, "d",
                                    [*common, "--advertise-host", net.address(KV_LINK, "decode"), *cfg.decode_args])
            router = self._spawn_in("router", "router.main", ROUTER_PORT, "h", [
                "--model", cfg.model, "--served-model-name", cfg.served_model_name, "--kv-mode", cfg.kv_mode,
                "--policy", cfg.policy, "--host", "0.0.0.0", "--prefill", prefill.address,
                "--decode", decode.address, *cfg.router_args])
            self.url = f"http://{router.address}"
            self._wait_ready(time.monotonic() + cfg.start_timeout_s)
        except NetnsError as error:
            self.stop()
            raise ClusterStartError(str(error)) from error
        except BaseException:
            self.stop()
            raise

    def _spawn_in(self, role: str, module: str, port: int, link: str, args: list[str]) -> Process:
        """Start `module` in the role's namespace; its address is the one it has on `link` (its peer's side)."""
        command = [*self.net.exec_prefix(role), "nice", "-n", str(self.nice), sys.executable, "-m", module,
                   "--port", str(port), *args]
        process = Process(role if role == "router" else f"{role}-0", f"{self.net.address(link, role)}:{port}",
                          subprocess.Popen(command, env=child_environment(2)))
        self.processes.append(process)
        return process

    def stop(self, grace_s: float = 10.0) -> None:
        try:
            super().stop(grace_s)
        finally:
            self.net.destroy()
