"""`hack-cluster`: the whole system on one machine in one command.

    hack-cluster --model DIR [--prefill N --decode M --kv-mode MODE --port 8000 --policy round_robin]

Starts N `hack-prefill` and M `hack-decode` processes on free loopback ports and `hack-router` in front of them,
waits until the router's /ready reports every instance healthy, prints the URL, and runs until
Ctrl-C or SIGTERM, then stops every process (SIGTERM, then SIGKILL after a grace period). If a process dies while
the cluster starts, it says which and exits non-zero. Later, a prefill or decode instance that exits (crash,
kill -9, or a drain after someone's SIGTERM) is restarted on the same port after an exponential backoff, up to
--max-restarts times in a row (a run of --stable-after seconds resets the count); meanwhile the router routes
around it and takes it back once its health check passes. A dying router ends the cluster.
`Cluster` is the same thing as a Python object, for tests and benchmarks (`supervise=True` restarts instances
from a background thread).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx

from common.default_model import model_from_env, served_model_name
from common.kv.config import MODES
from router.policy import POLICIES

log = logging.getLogger("hack-cluster")
LOOPBACK = "127.0.0.1"


class ClusterStartError(RuntimeError):
    """A process of the cluster died or did not become ready in time."""


@dataclass
class Process:
    name: str  # e.g. "prefill-0", "decode-1", "router"
    address: str  # host:port it serves
    popen: subprocess.Popen = field(repr=False)
    command: list[str] = field(default_factory=list, repr=False)
    started_at: float = field(default_factory=time.monotonic)
    restarts: int = 0  # restarts in a row (reset once it ran --stable-after seconds)
    restart_at: float | None = None  # when the pending restart is due
    given_up: bool = False

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def describe_exit(self) -> str:
        code = self.popen.returncode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        return f"{self.name} ({self.address}) died with {how}"


@dataclass(frozen=True)
class ClusterConfig:
    model: str
    num_prefill: int = 1
    num_decode: int = 1
    kv_mode: str = "hack"
    port: int = 8000  # the router's HTTP port; 0 = any free port
    policy: str = "round_robin"
    prefill_args: tuple[str, ...] = ()  # extra flags for every prefill instance
    decode_args: tuple[str, ...] = ()  # extra flags for every decode instance
    router_args: tuple[str, ...] = ()
    start_timeout_s: float = 120.0
    host: str = LOOPBACK  # where the router listens (0.0.0.0 to serve other machines); instances stay on loopback
    max_restarts: int = 5  # restarts in a row of one instance before the supervisor gives up on it
    restart_backoff_s: float = 0.5  # first restart delay; doubles with each restart in a row
    max_restart_backoff_s: float = 30.0
    stable_after_s: float = 60.0  # an instance up this long has its restart count reset

    def __post_init__(self) -> None:
        if self.num_prefill < 1 or self.num_decode < 1:
            raise ValueError(f"need at least one prefill and one decode instance, got {self.num_prefill} and "
                             f"{self.num_decode}")
        if self.kv_mode not in MODES:
            raise ValueError(f"kv_mode must be one of {MODES}, got {self.kv_mode!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.start_timeout_s <= 0:
            raise ValueError(f"start_timeout_s must be > 0, got {self.start_timeout_s}")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if not 0 < self.restart_backoff_s <= self.max_restart_backoff_s:
            raise ValueError(f"need 0 < restart_backoff_s <= max_restart_backoff_s, got {self.restart_backoff_s} "
                             f"and {self.max_restart_backoff_s}")

    @property
    def served_model_name(self) -> str:
        """What clients send as `model`: the embedded model's name, the checkpoint directory's name (e.g.
        "stories260K") or the GGUF file's name without .gguf."""
        return served_model_name(self.model)


class Cluster:
    def __init__(self, config: ClusterConfig, supervise: bool = False) -> None:
        self.config = config
        self.processes: list[Process] = []
        self.url = ""
        self._supervise = supervise
        self._supervisor: threading.Thread | None = None
        self._stopping = threading.Event()

    def __enter__(self) -> "Cluster":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def by_role(self, role: str) -> list[Process]:
        return [p for p in self.processes if p.name.startswith(role)]

    def start(self) -> None:
        """Start every process and wait until all are ready; ClusterStartError (after stopping the rest) if not."""
        cfg = self.config
        deadline = time.monotonic() + cfg.start_timeout_s
        try:
            prepare_model(cfg.model)
            for role, count, extra in (("prefill", cfg.num_prefill, cfg.prefill_args),
                                       ("decode", cfg.num_decode, cfg.decode_args)):
                for i in range(count):
                    self._spawn(f"{role}-{i}", f"{role}_service.main", free_port(),
                                ["--model", cfg.model, "--kv-mode", cfg.kv_mode, "--host", LOOPBACK, *extra])
            # The router starts alongside: its health loop finds the instances once they listen.
            router = self._spawn("router", "router.main", cfg.port or free_port(), [
                "--model", cfg.model, "--served-model-name", cfg.served_model_name, "--kv-mode", cfg.kv_mode,
                "--policy", cfg.policy, "--host", cfg.host,
                "--prefill", *[p.address for p in self.by_role("prefill")],
                "--decode", *[p.address for p in self.by_role("decode")], *cfg.router_args])
            self.url = f"http://{router.address}"
            self._wait_ready(deadline)
            if self._supervise:
                self._supervisor = threading.Thread(target=self._supervise_forever, name="hack-cluster-supervisor",
                                                    daemon=True)
                self._supervisor.start()
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, module: str, port: int, args: list[str]) -> Process:
        command = [sys.executable, "-m", module, "--port", str(port), *args]
        log.debug("starting %s: %s", name, " ".join(command))
        process = Process(name, f"{LOOPBACK}:{port}", self._popen(command), command)
        self.processes.append(process)
        return process

    def _popen(self, command: list[str]) -> subprocess.Popen:
        return subprocess.Popen(command, env=child_environment(self.config.num_prefill + self.config.num_decode))

    # -- supervision ----------------------------------------------------------------------------------------------

    def supervise_once(self, now: float | None = None) -> None:
        """Restart the prefill and decode instances that exited, each after its backoff; give up after
        max_restarts in a row. Call it often (main's loop, or the supervisor thread)."""
        now = time.monotonic() if now is None else now
        cfg = self.config
        for process in self.processes:
            if process.name == "router" or process.given_up or self._stopping.is_set():
                continue
            if process.alive:
                if process.restarts and now - process.started_at >= cfg.stable_after_s:
                    process.restarts = 0
                continue
            if process.restart_at is None:
                self._schedule_restart(process, now)
            elif now >= process.restart_at:
                self._restart(process, now)

    def _schedule_restart(self, process: Process, now: float) -> None:
        cfg = self.config
        if process.restarts >= cfg.max_restarts:
            process.given_up = True
            log.error("%s; it was restarted %d times in a row: giving up on it", process.describe_exit(),
                      process.restarts)
            return
        delay = min(cfg.restart_backoff_s * 2 ** process.restarts, cfg.max_restart_backoff_s)
        process.restart_at = now + delay
        log.error("%s; restarting it in %.1f s (restart %d of at most %d in a row)", process.describe_exit(), delay,
                  process.restarts + 1, cfg.max_restarts)

    def _restart(self, process: Process, now: float) -> None:
        process.popen = self._popen(process.command)
        process.restarts += 1
        process.started_at, process.restart_at = now, None
        log.warning("%s restarted (pid %d); the router takes it back once its health check passes", process.name,
                    process.popen.pid)

    def _supervise_forever(self) -> None:
        while not self._stopping.wait(0.1):
            self.supervise_once()

    def _wait_ready(self, deadline: float) -> None:
        """Until the router's /ready lists every instance as healthy."""
        status = "the router did not answer"
        while time.monotonic() < deadline:
            for process in self.processes:
                if not process.alive:
                    raise ClusterStartError(process.describe_exit())
            try:
                reply = httpx.get(f"{self.url}/ready", timeout=1.0)
                instances = reply.json()["instances"]
                if reply.status_code == 200 and all(i["healthy"] for i in instances):
                    return
                status = "unhealthy: " + ", ".join(i["address"] for i in instances if not i["healthy"])
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        raise ClusterStartError(f"the cluster was not ready after {self.config.start_timeout_s:g} s ({status})")

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every process (router first, so no new work arrives), SIGKILL what is left after grace_s."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()
        for process in reversed(self.processes):
            if process.alive:
                process.popen.terminate()
        deadline = time.monotonic() + grace_s
        for process in self.processes:
            try:
                process.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %g s: killing it", process.name, grace_s)
                process.popen.kill()
                process.popen.wait()
        self.processes.clear()


def child_environment(num_model_processes: int) -> dict[str, str]:
    """The children's environment. Unless the user chose OMP_NUM_THREADS, the CPU cores are split between the
    model processes: on CPU, several processes each running torch with every core thrash (a decode step was
    measured 5-26x slower on 2 cores), while on GPU the CPU threads matter little."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // num_model_processes))
    return env


def prepare_model(model: str) -> None:
    """Resolve the model once here (a GGUF checkpoint is converted into the cache), so that the instances
    and the router find it ready instead of each converting it; a bad --model fails before any process starts."""
    from common.loader import CheckpointError, resolve_model_path

    try:
        resolve_model_path(model)
    except CheckpointError as error:
        raise ClusterStartError(f"model {model!r}: {error}") from None


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hack-cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory, .gguf file, hub id or embedded model name "
                        "(default: $HACK_MODEL, else smollm2-135m-instruct)")
    parser.add_argument("--prefill", type=int, default=1, help="prefill instances (default 1)")
    parser.add_argument("--decode", type=int, default=1, help="decode instances (default 1)")
    parser.add_argument("--kv-mode", choices=MODES, default="hack")
    parser.add_argument("--host", default=os.environ.get("HACK_HOST", LOOPBACK),
                        help="the router's listen address (default 127.0.0.1; 0.0.0.0 for all) [HACK_HOST]")
    parser.add_argument("--port", type=int, default=int(os.environ.get("HACK_PORT", "8000")),
                        help="the router's HTTP port (default 8000) [HACK_PORT]")
    parser.add_argument("--policy", choices=POLICIES, default="round_robin",
                        help="how the router picks instances (default round_robin)")
    parser.add_argument("--prefill-arg", action="append", default=[], metavar="FLAG",
                        help="extra flag for every prefill instance, e.g. --prefill-arg=--kv-link-gbps=10 (repeatable)")
    parser.add_argument("--decode-arg", action="append", default=[], metavar="FLAG",
                        help="extra flag for every decode instance, e.g. --decode-arg=--kv-blocks=256 (repeatable)")
    parser.add_argument("--start-timeout", type=float, default=120.0, help="seconds to wait for readiness")
    parser.add_argument("--max-restarts", type=int, default=5,
                        help="restarts in a row of an instance that keeps exiting before giving up on it (default 5)")
    parser.add_argument("--restart-backoff", type=float, default=0.5,
                        help="seconds before the first restart; doubles with each restart in a row, up to 30 "
                             "(default 0.5)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per readiness poll otherwise
    args = parse_args(argv)
    try:
        config = ClusterConfig(model_from_env(args.model), args.prefill, args.decode, args.kv_mode, args.port,
                               args.policy, tuple(args.prefill_arg), tuple(args.decode_arg),
                               start_timeout_s=args.start_timeout, host=args.host, max_restarts=args.max_restarts,
                               restart_backoff_s=args.restart_backoff)
    except ValueError as error:
        print(f"hack-cluster: error: {error}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops the cluster like Ctrl-C does
    cluster = Cluster(config)
    try:
        cluster.start()
        print(f"HACK serve is ready at {cluster.url}/v1 (OpenAI-compatible, model {config.served_model_name!r}; "
              "Ctrl-C stops it)", flush=True)
        return _supervise(cluster)
    except ClusterStartError as error:
        print(f"hack-cluster: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        log.info("stopping the cluster")
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the shutdown short
            signal.signal(sig, signal.SIG_IGN)
        cluster.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _supervise(cluster: Cluster) -> int:
    """Restart instances that exit; return (non-zero) when the router dies."""
    while True:
        time.sleep(0.2)
        cluster.supervise_once()
        router = next(p for p in cluster.processes if p.name == "router")
        if not router.alive:
            log.error("%s", router.describe_exit())
            return 1


if __name__ == "__main__":
    sys.exit(main())
