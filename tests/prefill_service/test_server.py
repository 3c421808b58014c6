"""The prefill service behind its gRPC API: validation, token-budget batching, link pacing, refusals, cancel."""
from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from common.kv.config import KVConfig
from common.kv.format import KVLayout
from proto import hack_pb2
from tests.decode_service.harness import SPEC, generate_request, read_tokens, run_request, run_services


@pytest.fixture(scope="module")
def model_dir(random_checkpoint):
    return random_checkpoint(SPEC)


def random_prompt(length: int) -> list[int]:
    return torch.randint(3, SPEC.vocab_size, (length,)).tolist()


async def prefill_error(services, **fields) -> grpc.aio.AioRpcError:
    request = {"request_id": "r", "token_ids": [5, 6], "decode_address": services.decode_address, **fields}
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await services.prefill_stub.Prefill(hack_pb2.PrefillRequest(**request))
    return error.value


def test_bad_requests_get_a_clear_status(model_dir) -> None:
    async def scenario():
        async with run_services(model_dir, "hack") as services:
            return [
                await prefill_error(services, token_ids=[]),
                await prefill_error(services, token_ids=[5, SPEC.vocab_size]),
                await prefill_error(services, token_ids=[5] * SPEC.max_position_embeddings),
                await prefill_error(services, decode_address=""),
                await prefill_error(services, kv_mode=hack_pb2.KV_MODE_FP16),
                await prefill_error(services, sampling=hack_pb2.SamplingParams(temperature=-1.0)),
                await prefill_error(services),  # the decode instance never admitted "r"
            ]

    errors = asyncio.run(scenario())
    expected = [
        (grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
        (grpc.StatusCode.INVALID_ARGUMENT, "out of range"),
        (grpc.StatusCode.INVALID_ARGUMENT, "exceeds the context window"),
        (grpc.StatusCode.INVALID_ARGUMENT, "decode_address is empty"),
        (grpc.StatusCode.FAILED_PRECONDITION, "serves kv_mode 'hack'"),
        (grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (grpc.StatusCode.NOT_FOUND, "no admitted request 'r'"),  # the decode instance's refusal, relayed
    ]
    assert [(e.code(), m in e.details()) for e, m in zip(errors, [m for _, m in expected])] == \
           [(code, True) for code, _ in expected]


def test_a_slow_link_paces_the_kv_push(model_dir) -> None:
    prompt = random_prompt(100)
    layout = KVLayout(KVConfig(mode="fp16", partition=32), SPEC.num_kv_heads, SPEC.head_dim)
    kv_bytes = layout.wire_bytes(len(prompt), SPEC.num_layers)  # 51 kB in fp16
    gbps = kv_bytes * 8 / 0.25 / 1e9  # a link that needs 0.25 s for it

    async def scenario():
        async with run_services(model_dir, "fp16", prefill_flags=["--kv-link-gbps", str(gbps)]) as services:
            return await run_request(services, "r", prompt, 2)

    tokens, response = asyncio.run(scenario())
    assert len(tokens) == 2 and response.timings.kv_bytes == kv_bytes
    assert 0.24 <= response.timings.kv_transfer_s < 2.0


def test_an_after_forward_push_sends_the_same_kv_once_the_forward_is_done(model_dir) -> None:
    prompt = random_prompt(100)
    layout = KVLayout(KVConfig(mode="hack", partition=32), SPEC.num_kv_heads, SPEC.head_dim)
    gbps = layout.wire_bytes(len(prompt), SPEC.num_layers) * 8 / 0.25 / 1e9  # a link that needs 0.25 s for it

    async def scenario(kv_push: str):
        async with run_services(model_dir, "hack", prefill_flags=["--kv-push", kv_push,
                                                                  "--kv-link-gbps", str(gbps)]) as services:
            tokens, response = await run_request(services, "r", prompt, 4)
            return [t.token_id for t in tokens], response.timings

    layerwise_tokens, layerwise = asyncio.run(scenario("layerwise"))
    tokens, timings = asyncio.run(scenario("after-forward"))
    assert tokens == layerwise_tokens and timings.kv_bytes == layerwise.kv_bytes
    # The whole push follows the forward: the time past it is the link's (a layer-wise one overlaps the two).
    assert 0.24 <= timings.kv_transfer_s - timings.prefill_compute_s < 5.0  # the top: room for a loaded CPU


def test_cancel_stops_a_prefill_and_its_push(model_dir) -> None:
    async def scenario():
        # a slow link keeps the push in flight long enough to cancel it
        async with run_services(model_dir, "fp16", prefill_flags=["--kv-link-gbps", "0.0001"]) as services:
            prompt = random_prompt(60)
            stream = services.decode_stub.Generate(generate_request("r", len(prompt), 4))
            await stream.read()
            prefill = asyncio.ensure_future(services.prefill_stub.Prefill(hack_pb2.PrefillRequest(
                request_id="r", token_ids=prompt, decode_address=services.decode_address)))
            while (await services.prefill_stub.Stats(hack_pb2.StatsRequest())).prefill_queue_len == 0:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            found = await services.prefill_stub.Cancel(hack_pb2.CancelRequest(request_id="r"))
            with pytest.raises(grpc.aio.AioRpcError) as cancelled:
                await prefill
            stats = await services.prefill_stub.Stats(hack_pb2.StatsRequest())
            # the decode instance keeps waiting for another attempt; cancelling it there frees the request
            await services.decode_stub.Cancel(hack_pb2.CancelRequest(request_id="r"))
            with pytest.raises(grpc.aio.AioRpcError):
                await read_tokens(stream)
            return found.found, cancelled.value, stats, await services.decode_stats()

    found, error, stats, decode_stats = asyncio.run(scenario())
    assert found and error.code() == grpc.StatusCode.CANCELLED
    assert stats.prefill_queue_len == 0 and stats.counters.requests_cancelled == 1
    assert decode_stats.used_kv_blocks == 0
