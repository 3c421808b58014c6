"""scripts/netns-cluster.sh: router, prefill and decode in their own network namespaces, the KV link shaped to
1 Gbit/s by tc. Runs where this process may create namespaces (root, iproute2); skips with the reason elsewhere.
Also the namespace plumbing itself (common/netns.py): addresses, shaping, cleanup.

The rate check times the push past the forward of a prefill instance that pushes its whole KV once the forward
is done (--kv-push after-forward, the script's default), at nice -10: the link's time, whatever the forward
took and however loaded the machine (ratio 1.07-1.08 at load 7-19 on 2 cores, docs/deploy.md)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from bench.hack_bench.netns_check import SKIPPED
from common.netns import LinkShape, Netns, run, unavailable_reason

REPO_ROOT = Path(__file__).resolve().parents[2]
REASON = unavailable_reason()
needs_netns = pytest.mark.skipif(REASON is not None, reason=f"network namespaces unavailable: {REASON}")


def namespaces() -> str:
    return run("ip", "netns", "list") if REASON is None else ""


@needs_netns
def test_the_namespaces_are_linked_shaped_and_removed():
    net = Netns(f"hkt{os.getpid() % 10000}")
    try:
        net.create()
        net.shape(LinkShape(1.0))
        assert all(net.namespace(role) in namespaces() for role in ("router", "prefill", "decode"))
        qdisc = run("tc", "-n", net.namespace("prefill"), "qdisc", "show", "dev", f"{net.prefix}k0")
        assert "tbf" in qdisc and "rate 1Gbit" in qdisc
        # The decode instance's KV address is on the shaped link, the prefill's own end of it is next door.
        assert net.address("k", "decode") != net.address("d", "decode")
        route = run("ip", "-n", net.namespace("prefill"), "route", "get", net.address("k", "decode"))
        assert f"dev {net.prefix}k0" in route
    finally:
        net.destroy()
    assert net.prefix not in namespaces()
    assert f"{net.prefix}h0" not in run("ip", "-o", "link", "show")


def test_a_bad_link_is_refused():
    with pytest.raises(ValueError, match="Gbit/s"):
        LinkShape(0)
    with pytest.raises(ValueError, match="delay"):
        LinkShape(1, delay_ms=-1)
    with pytest.raises(ValueError, match="prefix"):
        Netns("has-dash")


@pytest.mark.slow
@needs_netns
def test_completions_across_a_1_gbit_link_match_one_machine(tmp_path):
    results_path, prefix = tmp_path / "netns.json", f"hkc{os.getpid() % 10000}"
    result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "netns-cluster.sh"), "--gbps", "1",
                             "--json", str(results_path)], capture_output=True, text=True, timeout=900,
                            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), HACK_NETNS_PREFIX=prefix))
    assert result.returncode != SKIPPED, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr
    assert prefix not in namespaces()  # everything removed
    (row,) = json.loads(results_path.read_text())
    assert row["identical"] and row["requests"] == 5 and row["kv_push"] == "after-forward"
    assert row["kv_bytes_per_request"] > 30e6  # 32 MiB of fp16 KV: 268 ms at 1 Gbit/s
    assert row["expected_s"] == pytest.approx(row["kv_bytes_per_request"] * 8 / 1e9)
    assert row["ratio"] == pytest.approx(1.0, abs=0.2), (
        f"KV transfer {row['transfer_s'] * 1e3:.0f} ms vs bytes / rate {row['expected_s'] * 1e3:.0f} ms "
        f"(load {row['load_average'][0]:.1f})")
