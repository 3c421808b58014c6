"""docker/: the health probe against real gRPC and HTTP servers, and the compose files' structure and variables.

The images themselves are exercised by scripts/docker-smoke.sh (it needs Docker, so it is not part of pytest).
"""
from __future__ import annotations

import importlib.util
import re
import socket
import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO_ROOT / "docker"
# Where the programs read their HACK_* variables: router and KV flags name them in full, services through env("X").
FLAG_SOURCES = ("router/main.py", "common/service.py", "common/kv/options.py", "prefill_service/main.py",
                "decode_service/main.py", "common/grpc_security.py")
# Variables compose itself interprets (mounts, ports, image), not flags of a program.
COMPOSE_ONLY = {"HACK_MODEL_DIR", "HACK_ROUTER_BIND", "HACK_ROUTER_PORT", "HACK_IMAGE", "HACK_TORCH_VARIANT",
                "HACK_PREFILL_GPU", "HACK_DECODE_GPU"}


@pytest.fixture(scope="module")
def healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hack_healthcheck", DOCKER_DIR / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=None)


def test_grpc_probe_follows_the_serving_status(healthcheck: ModuleType, health_server) -> None:
    address, servicer = health_server
    servicer.set("hack.v1.DecodeService", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck.main(["grpc", address, "hack.v1.DecodeService"]) == 0
    servicer.set("hack.v1.DecodeService", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck.main(["grpc", address, "hack.v1.DecodeService"]) == 1
    assert healthcheck.main(["grpc", address, "hack.v1.PrefillService"]) == 1  # unknown service: NOT_FOUND


def test_grpc_probe_of_a_closed_port_is_unhealthy(healthcheck: ModuleType, capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens on it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert healthcheck.main(["grpc", f"127.0.0.1:{port}"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_http_probe_needs_a_2xx_answer(healthcheck: ModuleType) -> None:
    class Ready(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self.send_response(200 if self.path == "/ready" else 503)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert healthcheck.main(["http", f"{base}/ready"]) == 0
        assert healthcheck.main(["http", f"{base}/not-ready"]) == 1
    finally:
        server.shutdown()


def test_probe_rejects_an_unknown_kind(healthcheck: ModuleType) -> None:
    assert healthcheck.main(["tcp", "localhost:1"]) == 2
    assert healthcheck.main([]) == 2


def load_compose(name: str) -> dict:
    return yaml.safe_load((DOCKER_DIR / name).read_text())


def test_compose_stack_is_health_checked_and_ordered() -> None:
    compose = load_compose("compose.yaml")
    assert "version" not in compose  # obsolete in Compose v2, and it would pin a file format in 1.29
    services = compose["services"]
    assert set(services) == {"router", "prefill", "decode"}
    for name, service in services.items():
        assert service["restart"] == "unless-stopped", name
        assert service["stop_grace_period"] == "40s", name  # room for the 30 s default drain
        assert service["healthcheck"]["test"][:2] == ["CMD", "hack-healthcheck"], name
        assert service["command"] == [f"hack-{name}"]
    assert services["prefill"]["healthcheck"]["test"][2:4] == ["grpc", "localhost:50051"]
    assert services["decode"]["healthcheck"]["test"][2:4] == ["grpc", "localhost:50061"]
    assert services["router"]["depends_on"] == {
        "prefill": {"condition": "service_healthy"}, "decode": {"condition": "service_healthy"}}
    assert services["router"]["ports"] == ["${HACK_ROUTER_BIND:-127.0.0.1}:${HACK_ROUTER_PORT:-8000}:8000"]
    assert services["router"]["environment"]["HACK_PREFILL"].endswith("prefill:50051}")
    assert services["router"]["environment"]["HACK_DECODE"].endswith("decode:50061}")


def test_model_mount_is_read_only() -> None:
    for service in load_compose("compose.yaml")["services"].values():
        assert "${HACK_MODEL_DIR:-hack-no-model}:/models:ro" in service["volumes"]


def test_replicas_are_listed_in_the_router() -> None:
    replicas = load_compose("compose.replicas.yaml")["services"]
    router = replicas["router"]
    for role, port in (("prefill", 50051), ("decode", 50061)):
        assert replicas[f"{role}-2"]["extends"] == {"file": "compose.yaml", "service": role}
        assert router["environment"][f"HACK_{role.upper()}"] == f"{role}:{port},{role}-2:{port}"
        assert router["depends_on"][f"{role}-2"] == {"condition": "service_healthy"}


def test_gpu_override_reserves_a_device_for_each_instance() -> None:
    services = load_compose("compose.gpu.yaml")["services"]
    for name in ("prefill", "decode"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert services[name]["environment"]["HACK_DEVICE"] == "${HACK_DEVICE:-cuda}"
    assert "deploy" not in services["router"]


def test_every_compose_variable_is_a_flag_of_some_program() -> None:
    """Guards against drift: a renamed flag variable would otherwise be passed through silently and ignored."""
    text = "\n".join((DOCKER_DIR / name).read_text() for name in ("compose.yaml", "compose.gpu.yaml"))
    variables = set(re.findall(r"\b(HACK_[A-Z0-9_]+)", text)) - COMPOSE_ONLY
    sources = "\n".join((REPO_ROOT / path).read_text() for path in FLAG_SOURCES)
    unknown = sorted(v for v in variables if f'"{v}"' not in sources and f'env("{v[len("HACK_"):]}"' not in sources)
    assert not unknown, f"compose passes variables no program reads: {unknown}"
