"""Prometheus metrics of the router, served at GET /metrics.

Latencies are what clients see (TTFT, inter-token latency, end-to-end); the KV transfer numbers come from each
PrefillResponse and the decode timers from each request's last token. Per-instance load is read from the
instance pool at scrape time, right after a fresh Stats poll (app.py), and only for instances in rotation.
"""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from proto import hack_pb2
from router.instances import InstancePool, Role

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)

REQUEST_STATUSES = ("success", "invalid", "failed", "cancelled")


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("hack_router_time_to_first_token_seconds", "Request arrival to first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("hack_router_inter_token_latency_seconds",
                                             "Time between consecutive tokens of a request.",
                                             buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e_latency = Histogram("hack_router_e2e_request_latency_seconds", "Request arrival to last token.",
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.prefill_queue = Histogram("hack_router_prefill_queue_seconds", "Prefill received to started (from P).",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.prefill_compute = Histogram("hack_router_prefill_compute_seconds", "Prefill forward time (from P).",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.kv_transfer = Histogram("hack_router_kv_transfer_seconds", "KV push time from P to D (from P).",
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.kv_bytes = Counter("hack_router_kv_transfer_bytes", "KV bytes sent from prefill to decode.",
                                registry=r)
        self.decode_kv_wait = Histogram("hack_router_decode_kv_wait_seconds",
                                        "Admission to complete KV on the decode instance.",
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self.decode_queue = Histogram("hack_router_decode_queue_seconds", "KV complete to first decode step.",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.decode = Histogram("hack_router_decode_seconds", "First decode step to last token (from D).",
                                buckets=_LATENCY_BUCKETS, registry=r)
        self.decode_attention = Histogram("hack_router_decode_attention_seconds",
                                          "Part of the decode time spent in attention (from D; 0 if not measured).",
                                          buckets=_LATENCY_BUCKETS, registry=r)
        self.requests = Counter("hack_router_requests", "Finished requests by outcome.", ["status"], registry=r)
        self.prompt_tokens = Counter("hack_router_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter("hack_router_generation_tokens", "Tokens streamed back.", registry=r)
        self.prefill_retries = Counter("hack_router_prefill_retries", "Prefills retried on another instance.",
                                       registry=r)
        self.migrations = Counter("hack_router_migrations", "Requests resumed on another decode instance after "
                                  "theirs failed mid-request.", registry=r)
        for status in REQUEST_STATUSES:
            self.requests.labels(status)  # export zeros before the first request

    def watch_pool(self, pool: InstancePool) -> None:
        self.registry.register(_InstancePoolCollector(pool))

    def observe_prefill(self, timings: hack_pb2.PrefillTimings) -> None:
        self.prefill_queue.observe(timings.queue_s)
        self.prefill_compute.observe(timings.prefill_compute_s)
        self.kv_transfer.observe(timings.kv_transfer_s)
        self.kv_bytes.inc(timings.kv_bytes)

    def observe_decode(self, timers: hack_pb2.DecodeTimers) -> None:
        self.decode_kv_wait.observe(timers.kv_wait_s)
        self.decode_queue.observe(timers.queue_s)
        self.decode.observe(timers.decode_s)
        self.decode_attention.observe(timers.attention_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _InstancePoolCollector(Collector):
    def __init__(self, pool: InstancePool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        labels = ["role", "address"]
        healthy = GaugeMetricFamily("hack_router_instance_healthy", "1 when the instance is in rotation.",
                                    labels=labels)
        inflight = GaugeMetricFamily("hack_router_instance_inflight_requests",
                                     "Requests this router has open on the instance.", labels=labels)
        failures = CounterMetricFamily("hack_router_instance_unavailable",
                                       "RPCs that failed with UNAVAILABLE.", labels=labels)
        free_blocks = GaugeMetricFamily("hack_router_decode_free_kv_blocks", "Free KV blocks (last Stats).",
                                        labels=["address"])
        running = GaugeMetricFamily("hack_router_decode_running_seqs", "Running sequences (last Stats).",
                                    labels=["address"])
        queue = GaugeMetricFamily("hack_router_prefill_queue_length", "Queued prefills (last Stats).",
                                  labels=["address"])
        for instance in self._pool.instances:
            key = [instance.role.value, instance.address]
            healthy.add_metric(key, float(instance.healthy))
            inflight.add_metric(key, instance.inflight)
            failures.add_metric(key, instance.failures)
            if instance.stats is None or not instance.healthy:
                continue  # no stale numbers for an instance out of rotation (a dead one keeps none)
            if instance.role is Role.DECODE:
                free_blocks.add_metric([instance.address], instance.stats.free_kv_blocks)
                running.add_metric([instance.address], instance.stats.running_seqs)
            else:
                queue.add_metric([instance.address], instance.stats.prefill_queue_len)
        yield from (healthy, inflight, failures, free_blocks, running, queue)
