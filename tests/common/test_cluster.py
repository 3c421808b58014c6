"""`hack-cluster` start-up failures and settings (the running cluster is tested in tests/test_cluster_e2e.py)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from common.cluster import ClusterConfig, free_port
from tests.conftest import REPO_ROOT
from tests.decode_service.harness import SPEC


@pytest.mark.slow
def test_a_process_dying_at_start_is_named_and_the_rest_are_stopped(random_checkpoint) -> None:
    model = random_checkpoint(SPEC)
    result = subprocess.run(
        [sys.executable, "-m", "common.cluster", "--model", str(model), "--port", "0",
         "--decode-arg=--kv-blocks=0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 1
    assert "hack-cluster: error: decode-0 (127.0.0.1:" in result.stderr
    assert "died with exit status 2" in result.stderr
    assert "--kv-blocks must be >= 1, got 0" in result.stderr  # the decode instance's own message, above it


@pytest.mark.parametrize("fields, message", [
    ({"num_prefill": 0}, "at least one prefill and one decode"),
    ({"num_decode": 0}, "at least one prefill and one decode"),
    ({"kv_mode": "int4"}, "kv_mode must be one of"),
    ({"policy": "random"}, "policy must be one of"),
    ({"port": 70000}, "port must be in"),
    ({"start_timeout_s": 0}, "start_timeout_s must be > 0"),
])
def test_bad_settings_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClusterConfig("model-dir", **fields)


def test_clients_name_the_model_by_its_directory() -> None:
    assert ClusterConfig("/models/stories260K").served_model_name == "stories260K"
    assert ClusterConfig("/m/SmolLM2-135M-Instruct.Q4_1.gguf").served_model_name == "SmolLM2-135M-Instruct.Q4_1"
    assert ClusterConfig("smollm2-135m-instruct").served_model_name == "smollm2-135m-instruct"
    assert ClusterConfig("tiny-random").served_model_name == "tiny-random"


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = {free_port() for _ in range(5)}
    assert len(ports) > 1 and all(1024 <= p <= 65535 for p in ports)


def test_router_host_flag_and_environment(monkeypatch):
    from common.cluster import parse_args

    assert parse_args([]).host == "127.0.0.1"
    monkeypatch.setenv("HACK_HOST", "0.0.0.0")
    assert parse_args([]).host == "0.0.0.0"
    assert parse_args(["--host", "::1"]).host == "::1"


def test_children_share_the_cores_unless_the_user_chose(monkeypatch):
    import os

    from common.cluster import child_environment

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert child_environment(2)["OMP_NUM_THREADS"] == "4"
    assert child_environment(16)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert child_environment(2)["OMP_NUM_THREADS"] == "3"


class FakePopen:
    def __init__(self, returncode: int | None = None) -> None:
        self.returncode, self.pid = returncode, 4242

    def poll(self) -> int | None:
        return self.returncode


def test_the_supervisor_restarts_with_exponential_backoff_then_gives_up(caplog) -> None:
    from common.cluster import Cluster, Process

    cluster = Cluster(ClusterConfig("model-dir", max_restarts=3, restart_backoff_s=0.5, stable_after_s=60.0))
    spawned: list[list[str]] = []
    cluster._popen = lambda command: spawned.append(command) or FakePopen(returncode=-9)  # dies again at once
    decode = Process("decode-0", "127.0.0.1:1", FakePopen(returncode=-9), ["hack-decode", "--port", "1"])
    router = Process("router", "127.0.0.1:2", FakePopen(returncode=1), ["hack-router"])
    cluster.processes = [decode, router]
    delays, now = [], 0.0
    for _ in range(4):
        cluster.supervise_once(now)  # notices the exit, schedules the restart
        if decode.given_up:
            break
        delays.append(decode.restart_at - now)
        now = decode.restart_at
        cluster.supervise_once(now)  # restarts it
    assert delays == [0.5, 1.0, 2.0] and decode.given_up
    assert spawned == [decode.command] * 3  # the same command, so the same port; the router is never restarted
    assert "giving up on it" in caplog.text and "restarting it in 0.5 s" in caplog.text


def test_a_stable_instance_gets_its_restart_count_back() -> None:
    from common.cluster import Cluster, Process

    cluster = Cluster(ClusterConfig("model-dir", stable_after_s=10.0))
    cluster._popen = lambda command: FakePopen(returncode=None)
    decode = Process("decode-0", "127.0.0.1:1", FakePopen(returncode=-9), ["hack-decode"])
    cluster.processes = [decode]
    cluster.supervise_once(0.0)
    cluster.supervise_once(1.0)
    assert decode.alive and decode.restarts == 1
    cluster.supervise_once(5.0)
    assert decode.restarts == 1
    cluster.supervise_once(11.5)
    assert decode.restarts == 0
