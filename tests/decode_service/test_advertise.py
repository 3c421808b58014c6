"""The KV address a decode instance advertises to the router (what prefill instances push to)."""
from __future__ import annotations

import pytest

from decode_service.main import kv_address, parse_args


@pytest.mark.parametrize("advertise, host, port, expected", [
    ("10.1.2.3", "0.0.0.0", 50061, "10.1.2.3:50061"),  # POD_IP in a pod listening on every address
    ("", "10.1.2.3", 50061, "10.1.2.3:50061"),  # listening on one routable address
    ("fd00::3", "::", 50061, "[fd00::3]:50061"),
    ("", "0.0.0.0", 50061, ""),  # no idea which address: the router's dialed address is used
    ("", "127.0.0.1", 50061, ""),  # never advertise loopback
    ("", "localhost", 0, ""),
])
def test_kv_address(advertise, host, port, expected):
    assert kv_address(advertise, host, port) == expected


def test_advertising_needs_a_fixed_port():
    with pytest.raises(ValueError, match="fixed --port"):
        kv_address("10.1.2.3", "0.0.0.0", 0)


def test_pod_ip_is_the_default(monkeypatch):
    monkeypatch.delenv("HACK_ADVERTISE_HOST", raising=False)
    monkeypatch.setenv("POD_IP", "10.9.8.7")
    assert parse_args([]).advertise_host == "10.9.8.7"
    monkeypatch.setenv("HACK_ADVERTISE_HOST", "decode-0.example")
    assert parse_args([]).advertise_host == "decode-0.example"
