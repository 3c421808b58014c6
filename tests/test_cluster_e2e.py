"""The whole system as users run it: `hack-cluster` processes (router, prefill, decode) on loopback ports.

One cluster per KV mode for the module (stories260K). Completions through the cluster must equal in-process
`Engine` generation token for token; the hack cluster (two decode instances) also carries the load, cancel and
failure tests, the decode kill last since it takes an instance away.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from functools import partial

import grpc
import httpx
import openai
import pytest
import torch

from common.cluster import Cluster, ClusterConfig
from common.engine import Engine
from common.kv.config import PAPER_SETTING, KVConfig
from common.kv.factory import make_kv_backend
from common.kv.format import KVLayout
from common.loader import load_model
from common.sampling import SamplingParams
from proto import hack_pb2, hack_pb2_grpc

pytestmark = pytest.mark.slow

PROMPTS = ["Once upon a time", "The little dog ran to the park and"]
MAX_TOKENS = 40
NUM_DECODE = {"fp16": 1, "dequant": 1, "hack": 2}


@pytest.fixture(scope="module")
def loaded(stories260k):
    return load_model(stories260k, device="cpu")


@pytest.fixture(scope="module", params=["fp16", "dequant", "hack"])
def cluster(request, stories260k):
    mode = request.param
    config = ClusterConfig(str(stories260k), num_prefill=1, num_decode=NUM_DECODE[mode], kv_mode=mode, port=0,
                           decode_args=("--kv-memory-mb", "16"), router_args=("--health-interval", "0.5"))
    with Cluster(config) as running:
        yield running


@dataclass(frozen=True)
class Reference:
    text: str  # as a continuation of the prompt (leading space kept), the way the router detokenizes
    num_tokens: int
    finish_reason: str


def reference_completion(loaded, mode: str, prompt: str, max_tokens: int = MAX_TOKENS,
                         params: SamplingParams | None = None) -> Reference:
    """In-process generation (greedy unless params say otherwise) with the same model and KV mode."""
    kv = make_kv_backend(KVConfig(mode=mode), loaded.config, "cpu", torch.float32, max_tokens=1024)
    engine = Engine(loaded, kv)
    params = params or SamplingParams(max_tokens, temperature=0.0)
    completion = engine.generate([engine.encode(prompt)], [params])[0]
    decode = partial(loaded.tokenizer.decode, skip_special_tokens=True)
    text = decode(completion.prompt_ids + completion.token_ids)[len(decode(completion.prompt_ids)):]
    return Reference(text, len(completion.token_ids), completion.finish_reason)


def openai_client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)


def sse_events(response: httpx.Response) -> list[dict | str]:
    """The `data:` payloads of an SSE stream, JSON-decoded except the final [DONE]."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def decode_stats(address: str) -> hack_pb2.StatsResponse:
    with grpc.insecure_channel(address) as channel:
        return hack_pb2_grpc.DecodeServiceStub(channel).Stats(hack_pb2.StatsRequest(), timeout=2.0)


def wait_for_empty_pools(cluster: Cluster, timeout_s: float = 1.0) -> list[int]:
    """Used KV blocks of every live decode instance, polled until all are 0 or timeout_s passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        used = [decode_stats(p.address).used_kv_blocks for p in cluster.by_role("decode") if p.alive]
        if not any(used) or time.monotonic() > deadline:
            return used
        time.sleep(0.02)


def completion_body(cluster: Cluster, prompt: str, **fields) -> dict:
    return {"model": cluster.config.served_model_name, "prompt": prompt, "max_tokens": MAX_TOKENS,
            "temperature": 0.0, **fields}


# ---------------------------------------------------------------------------------------------------------------
# Every mode: the cluster generates what the in-process engine generates.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_openai_client_matches_the_engine(cluster: Cluster, loaded, prompt: str) -> None:
    expected = reference_completion(loaded, cluster.config.kv_mode, prompt)
    client = openai_client(cluster)
    request = {"model": cluster.config.served_model_name, "prompt": prompt, "max_tokens": MAX_TOKENS,
               "temperature": 0.0}
    whole = client.completions.create(**request)
    chunks = list(client.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert whole.choices[0].text == streamed == expected.text
    assert whole.usage.completion_tokens == chunks[-1].usage.completion_tokens == expected.num_tokens
    assert whole.choices[0].finish_reason == expected.finish_reason
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason


def test_seeded_sampling_matches_the_engine(cluster: Cluster, loaded) -> None:
    """Prefill samples output position 0 and decode the rest, yet a seed reproduces the engine's draw."""
    params = SamplingParams(MAX_TOKENS, temperature=0.9, top_p=0.95, seed=1234)
    expected = reference_completion(loaded, cluster.config.kv_mode, PROMPTS[0], params=params)
    response = openai_client(cluster).completions.create(
        **completion_body(cluster, PROMPTS[0], temperature=0.9, top_p=0.95, seed=1234))
    assert response.choices[0].text == expected.text


def test_raw_http_matches_the_engine(cluster: Cluster, loaded) -> None:
    prompt = PROMPTS[1]
    expected = reference_completion(loaded, cluster.config.kv_mode, prompt)
    whole = httpx.post(f"{cluster.url}/v1/completions", json=completion_body(cluster, prompt), timeout=30).json()
    with httpx.stream("POST", f"{cluster.url}/v1/completions", timeout=30,
                      json=completion_body(cluster, prompt, stream=True)) as response:
        assert response.status_code == 200
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == whole["choices"][0]["text"] == expected.text
    assert whole["usage"]["completion_tokens"] == expected.num_tokens


# ---------------------------------------------------------------------------------------------------------------
# The hack cluster: byte accounting, load, cancellation, a decode instance dying.
# ---------------------------------------------------------------------------------------------------------------


def kv_bytes_metric(cluster: Cluster) -> float:
    metrics = httpx.get(f"{cluster.url}/metrics", timeout=5).text
    return float(re.search(r"^hack_router_kv_transfer_bytes_total (\S+)$", metrics, re.M).group(1))


@pytest.mark.parametrize("cluster", ["hack"], indirect=True)
def test_kv_bytes_in_router_metrics_equal_the_format_accounting(cluster: Cluster, loaded, tinystories_text) -> None:
    layout = KVLayout(KVConfig(mode="hack"), loaded.config.num_kv_heads, loaded.config.head_dim)
    for prompt in ("Tim and his mom went to the store", tinystories_text.read_text()[:400]):  # ~10 and ~200 tokens
        before = kv_bytes_metric(cluster)
        reply = httpx.post(f"{cluster.url}/v1/completions", json=completion_body(cluster, prompt, max_tokens=2),
                           timeout=30).json()
        num_tokens = reply["usage"]["prompt_tokens"]
        expected = layout.wire_bytes(num_tokens, loaded.config.num_layers)
        # the prefill's reply (which carries the byte count) may land just after the last token
        deadline = time.monotonic() + 5.0
        while kv_bytes_metric(cluster) - before != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert kv_bytes_metric(cluster) - before == expected
    # whole 2-bit partitions make the long prompt's KV a fraction of its 16-bit size in the paper's format; the
    # default 192-token 16-bit window keeps a ~200-token prompt all 16-bit (never more bytes than fp16 mode)
    num_layers = loaded.config.num_layers
    paper = KVLayout(KVConfig(mode="hack", **PAPER_SETTING), loaded.config.num_kv_heads, loaded.config.head_dim)
    assert paper.wire_bytes(num_tokens, num_layers) < 0.5 * layout.fp16_bytes(num_tokens, num_layers)
    fp16 = KVLayout(KVConfig(mode="fp16"), loaded.config.num_kv_heads, loaded.config.head_dim)
    assert layout.wire_bytes(num_tokens, num_layers) <= fp16.wire_bytes(num_tokens, num_layers)


async def stream_completion(client: httpx.AsyncClient, body: dict,
                            arrivals: list[float] | None = None) -> tuple[int, list[dict | str]]:
    """(status, SSE events); each event's arrival time (time.monotonic) appended to `arrivals` when given."""
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        events = []
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                payload = line[len("data: "):]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
                if arrivals is not None:
                    arrivals.append(time.monotonic())
        return response.status_code, events


@pytest.mark.parametrize("cluster", ["hack"], indirect=True)
def test_32_concurrent_streams_complete_in_shared_batches(cluster: Cluster) -> None:
    lengths = torch.randint(1, 60, (32,)).tolist()

    async def run_all():
        async with httpx.AsyncClient(base_url=cluster.url, timeout=60) as client:
            bodies = [completion_body(cluster, PROMPTS[i % 2], max_tokens=n, ignore_eos=True,
                                      stream_options={"include_usage": True}) for i, n in enumerate(lengths)]
            return await asyncio.gather(*(stream_completion(client, b) for b in bodies))

    results = asyncio.run(run_all())
    for (status, events), n in zip(results, lengths):
        assert status == 200 and events[-1] == "[DONE]"
        assert events[-2]["usage"]["completion_tokens"] == n
    stats = [decode_stats(p.address) for p in cluster.by_role("decode")]
    assert max(s.counters.max_batch_size for s in stats) > 1
    assert wait_for_empty_pools(cluster) == [0, 0]


@pytest.mark.parametrize("cluster", ["hack"], indirect=True)
def test_a_cancelled_stream_frees_its_kv_within_a_second(cluster: Cluster) -> None:
    body = completion_body(cluster, PROMPTS[0], max_tokens=400, ignore_eos=True, stream=True)
    with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body, timeout=30) as response:
        data_lines = (line for line in response.iter_lines() if line.startswith("data: "))
        received = [next(data_lines) for _ in range(3)]
        busy = [decode_stats(p.address).used_kv_blocks for p in cluster.by_role("decode")]
    assert len(received) == 3 and sum(busy) > 0  # the client hung up mid-stream
    assert wait_for_empty_pools(cluster, timeout_s=1.0) == [0, 0]


@pytest.mark.parametrize("cluster", ["hack"], indirect=True)
def test_100_requests_leave_the_pools_empty(cluster: Cluster) -> None:
    async def run_all():
        limit = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=cluster.url, timeout=60) as client:
            async def one(i: int) -> int:
                async with limit:
                    body = completion_body(cluster, PROMPTS[i % 2], max_tokens=1 + i % 12)
                    return (await client.post("/v1/completions", json=body)).status_code
            return await asyncio.gather(*(one(i) for i in range(100)))

    assert asyncio.run(run_all()) == [200] * 100
    assert wait_for_empty_pools(cluster, timeout_s=1.0) == [0, 0]


@pytest.mark.parametrize("cluster", ["hack"], indirect=True)
def test_killing_a_decode_instance_migrates_its_streams_and_reroutes(cluster: Cluster) -> None:
    """Last: it takes decode-0 away for good (this cluster is not supervised; tests/test_chaos.py covers restarts).
    The stream on the killed instance resumes on the other one, losing and repeating nothing: the same tokens as
    the undisturbed stream through the seam and well past it, and as many. Not necessarily all 400: the resumed
    request's prefill recomputes the streamed tokens' K/V in one batched forward (other matmul shapes than the
    one-token steps, and a token may read as codes what was still in the 16-bit window when it was decoded), and
    once the 2-bit codes amplify that, a long greedy text may part late."""
    body = completion_body(cluster, PROMPTS[0], max_tokens=400, ignore_eos=True)
    victim = cluster.by_role("decode")[0]

    async def scenario():
        async with httpx.AsyncClient(base_url=cluster.url, timeout=60) as client:
            # Round robin puts two consecutive requests on different decode instances.
            streams = [asyncio.ensure_future(stream_completion(client, body, times)) for times in arrivals]
            while sum(decode_stats(p.address).running_seqs > 0 for p in cluster.by_role("decode")) < 2:
                await asyncio.sleep(0.02)
            killed_at.append(time.monotonic())
            victim.popen.kill()
            results = await asyncio.gather(*streams)
            after = [await client.post("/v1/completions", json={**body, "max_tokens": 5}) for _ in range(3)]
            ready = (await client.get("/ready")).json()
            metrics = (await client.get("/metrics")).text
            return results, after, ready, metrics

    arrivals, killed_at = [[], []], []
    results, after, ready, metrics = asyncio.run(scenario())
    tokens = []
    for status, events in results:
        assert status == 200 and events[-1] == "[DONE]"
        assert not any("error" in e for e in events[:-1])  # migrated, not failed
        tokens.append([e["choices"][0]["text"] for e in events[:-1]])
    assert len(tokens[0]) == len(tokens[1])  # nothing lost or repeated in count
    seam = max(sum(t < killed_at[0] for t in times) for times in arrivals)  # tokens out before the kill
    agreed = next((i for i, (a, b) in enumerate(zip(*tokens)) if a != b), len(tokens[0]))
    assert agreed >= min(len(tokens[0]), seam + 16), (seam, agreed)  # the same text through the seam
    assert re.search(r"^hack_router_migrations_total 1\.0$", metrics, re.M)
    assert [r.status_code for r in after] == [200, 200, 200]
    health = {i["address"]: i["healthy"] for i in ready["instances"]}
    assert health[victim.address] is False and ready["ready"] is True
