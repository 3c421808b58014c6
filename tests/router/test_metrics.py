"""The router's Prometheus metrics: every service timer lands in its own histogram."""
from __future__ import annotations

import random

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proto import hack_pb2
from router.metrics import RouterMetrics


def samples(metrics: RouterMetrics) -> dict[str, float]:
    return {s.name: s.value for family in text_string_to_metric_families(metrics.render().decode())
            for s in family.samples if not s.labels}


def test_prefill_and_decode_timers_are_summed_per_histogram() -> None:
    metrics = RouterMetrics()
    prefills = [hack_pb2.PrefillTimings(queue_s=random.random(), prefill_compute_s=random.random(),
                                        kv_transfer_s=random.random(), kv_bytes=random.randint(1, 10**6))
                for _ in range(3)]
    decodes = [hack_pb2.DecodeTimers(kv_wait_s=random.random(), queue_s=random.random(), decode_s=2 + random.random(),
                                     attention_s=random.random(), num_steps=17) for _ in range(3)]
    for prefill, decode in zip(prefills, decodes):
        metrics.observe_prefill(prefill)
        metrics.observe_decode(decode)
    values = samples(metrics)
    expected = {
        "hack_router_prefill_queue_seconds": [p.queue_s for p in prefills],
        "hack_router_prefill_compute_seconds": [p.prefill_compute_s for p in prefills],
        "hack_router_kv_transfer_seconds": [p.kv_transfer_s for p in prefills],
        "hack_router_decode_kv_wait_seconds": [d.kv_wait_s for d in decodes],
        "hack_router_decode_queue_seconds": [d.queue_s for d in decodes],
        "hack_router_decode_seconds": [d.decode_s for d in decodes],
        "hack_router_decode_attention_seconds": [d.attention_s for d in decodes],
    }
    for name, observed in expected.items():
        assert values[f"{name}_count"] == 3
        assert values[f"{name}_sum"] == pytest.approx(sum(observed))
    assert values["hack_router_kv_transfer_bytes_total"] == sum(p.kv_bytes for p in prefills)
