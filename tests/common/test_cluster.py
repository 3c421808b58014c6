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
