"""Where a request's time went, from two scrapes of the router's Prometheus /metrics.

The services time their own stages and the router exports them as histograms (router/metrics.py). The
difference of two scrapes taken around a run holds exactly that run's requests, so the mean of each stage is
(sum after - sum before) / (count after - count before). The stages, per request:

    queueing     prefill queue (received -> forward starts) + decode queue (KV complete -> first decode step)
    prefill      the prompt's forward (for compressed modes it includes quantizing the KV)
    kv_transfer  KV push time beyond the forward: the push opens when the forward starts and streams each
                 layer as soon as it ran, so only what is left after the forward delays the request (with
                 the prefill's --kv-push after-forward, the whole KV is left: all of it is the link's)
    attention    decode steps' time in the KV backend's attend: dequantize + attend (dequant), attend on the
                 codes (hack), plain fp16 attention (fp16)
    decode       the rest of the decode steps (projections, MLP, sampling)

Whatever the client saw beyond these (router, HTTP, gRPC hops, tokenizing) is the remainder `other`, computed
against the client's own mean latency where the row is built.
"""

from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from bench.hack_bench.records import BenchmarkError

MetricSnapshot = dict[str, float]  # sample name (with its {labels}, if any) -> value

PREFIX = "hack_router_"
E2E = "e2e_request_latency_seconds"
PREFILL_QUEUE = "prefill_queue_seconds"
PREFILL_COMPUTE = "prefill_compute_seconds"
KV_TRANSFER = "kv_transfer_seconds"
KV_BYTES = "kv_transfer_bytes_total"
DECODE_KV_WAIT = "decode_kv_wait_seconds"
DECODE_QUEUE = "decode_queue_seconds"
DECODE = "decode_seconds"
DECODE_ATTENTION = "decode_attention_seconds"
# The histograms every finished request adds one observation to.
PER_REQUEST_HISTOGRAMS = (E2E, PREFILL_QUEUE, PREFILL_COMPUTE, KV_TRANSFER, DECODE_KV_WAIT, DECODE_QUEUE, DECODE,
                          DECODE_ATTENTION)
STAGES = ("queueing", "prefill", "kv_transfer", "attention", "decode")


def parse_metrics(text: str) -> MetricSnapshot:
    """Every sample of a Prometheus text exposition except histogram buckets and `_created` timestamps."""
    snapshot: MetricSnapshot = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith(("_bucket", "_created")):
                continue
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            snapshot[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
    return snapshot


def snapshot_delta(before: Mapping[str, float], after: Mapping[str, float]) -> MetricSnapshot:
    """after - before for every sample of `after` (absent before = 0). Router counters never go down, so a
    sum or count that did means the router restarted between the scrapes."""
    delta = {name: value - before.get(name, 0.0) for name, value in after.items()}
    shrunk = [name for name, value in delta.items() if value < 0 and name.endswith(("_sum", "_count", "_total"))]
    if shrunk:
        raise BenchmarkError(f"router metrics went down between scrapes ({', '.join(shrunk[:3])}): "
                             "did the router restart?")
    return delta


def observations(delta: Mapping[str, float], histogram: str) -> int:
    """How many observations a histogram (name without the hack_router_ prefix) gained."""
    return round(delta.get(f"{PREFIX}{histogram}_count", 0.0))


def histogram_mean(delta: Mapping[str, float], histogram: str) -> float:
    """Mean of the observations a histogram gained (0 when it gained none)."""
    count = observations(delta, histogram)
    return delta.get(f"{PREFIX}{histogram}_sum", 0.0) / count if count else 0.0


@dataclass(frozen=True)
class JCTBreakdown:
    """Mean seconds per request of each stage (see the module docstring), plus the raw timers they come from."""

    requests: int
    queueing_s: float
    prefill_s: float
    kv_transfer_s: float
    attention_s: float
    decode_s: float
    kv_push_s: float  # push opened -> decode instance acknowledged (overlaps the forward)
    kv_wait_s: float  # decode side: admitted -> KV complete
    router_e2e_s: float  # the router's arrival -> last token
    kv_bytes_per_request: float

    def stages_s(self) -> dict[str, float]:
        """The stages in timeline order, for tables and stacked bars."""
        return {stage: getattr(self, f"{stage}_s") for stage in STAGES}


def jct_breakdown(delta: Mapping[str, float]) -> JCTBreakdown:
    """The breakdown of the requests that finished between two scrapes."""
    mean = {name: histogram_mean(delta, name) for name in PER_REQUEST_HISTOGRAMS}
    pushes = observations(delta, KV_TRANSFER)
    decode_s = mean[DECODE]
    attention_s = min(mean[DECODE_ATTENTION], decode_s)
    return JCTBreakdown(
        requests=observations(delta, E2E),
        queueing_s=mean[PREFILL_QUEUE] + mean[DECODE_QUEUE],
        prefill_s=mean[PREFILL_COMPUTE],
        kv_transfer_s=max(0.0, mean[KV_TRANSFER] - mean[PREFILL_COMPUTE]),
        attention_s=attention_s,
        decode_s=decode_s - attention_s,
        kv_push_s=mean[KV_TRANSFER],
        kv_wait_s=mean[DECODE_KV_WAIT],
        router_e2e_s=mean[E2E],
        kv_bytes_per_request=delta.get(PREFIX + KV_BYTES, 0.0) / pushes if pushes else 0.0,
    )


def is_settled(delta: Mapping[str, float], finished: int) -> bool:
    """Whether every per-request histogram has seen `finished` requests: a request's prefill timings reach
    the router with the Prefill reply, which can come after its last token was streamed."""
    return all(observations(delta, name) >= finished for name in PER_REQUEST_HISTOGRAMS)
