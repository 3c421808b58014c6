"""Failure handling of a request's trip through the instances, driven over HTTP against fake instances:
prefill retries, decode refusals, UNAVAILABLE marking and recovery, errors inside a stream, disconnects."""
from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest

from tests.router.fake_instances import FakeDecode, FakePrefill, serve
from tests.router.harness import EOS, cluster, eventually, leave_after_first_chunk, parse_sse, script

pytestmark = pytest.mark.anyio

TEXT = " the cat sat."


def completion(stream: bool = False, **fields: object) -> dict:
    return {"model": "byte-model", "prompt": "Once", "max_tokens": 50, "stream": stream, **fields}


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL])
async def test_failed_prefill_is_retried_on_another_instance(byte_model, byte_tokenizer, code):
    first, rest = script(byte_tokenizer, TEXT)
    broken, working = FakePrefill(first, fail_with=code), FakePrefill(first)
    async with cluster(byte_model, [broken, working], [FakeDecode(rest)]) as c:
        response = await c.client.post("/v1/completions", json=completion())
        broken_instance = c.pool.of_role(c.pool.instances[0].role)[0]
        broken_healthy = broken_instance.healthy
        metrics = (await c.client.get("/metrics")).text  # polls the instances afresh
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == TEXT
    assert len(broken.requests) == 1 and len(working.requests) == 1
    assert broken.requests[0].request_id == working.requests[0].request_id
    assert "hack_router_prefill_retries_total 1.0" in metrics
    # Only UNAVAILABLE takes an instance out of rotation; an INTERNAL error may be specific to the request.
    assert broken_healthy is (code is not grpc.StatusCode.UNAVAILABLE)


@pytest.mark.parametrize("stream", [False, True])
async def test_prefill_failing_everywhere_is_an_http_error_and_frees_the_decode(byte_model, stream):
    prefills = [FakePrefill(EOS, fail_with=grpc.StatusCode.INTERNAL) for _ in range(2)]
    decode = FakeDecode([EOS])
    async with cluster(byte_model, prefills, [decode]) as c:
        response = await c.client.post("/v1/completions", json=completion(stream))
        await eventually(lambda: decode.cancel_calls)
    assert response.status_code == 502  # never a 200 with an empty body, streaming or not
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "instance_error"
    assert "INTERNAL" in error["message"] and c.prefill_addresses[1] in error["message"]
    assert [len(p.requests) for p in prefills] == [1, 1]
    assert decode.cancel_calls == [decode.generate_requests[0].request_id]


async def test_request_errors_from_a_prefill_are_not_retried(byte_model):
    prefills = [FakePrefill(EOS, fail_with=grpc.StatusCode.INVALID_ARGUMENT), FakePrefill(EOS)]
    async with cluster(byte_model, prefills, [FakeDecode([EOS])]) as c:
        response = await c.client.post("/v1/completions", json=completion())
    assert response.status_code == 400 and response.json()["error"]["code"] == "rejected_by_instance"
    assert [len(p.requests) for p in prefills] == [1, 0]


async def test_decode_failing_mid_stream_ends_the_stream_with_an_error_event(byte_model, byte_tokenizer):
    first, rest = script(byte_tokenizer, TEXT)
    async with cluster(byte_model, [FakePrefill(first)], [FakeDecode(rest, fail_after_tokens=4)]) as c:
        streamed = await c.client.post("/v1/completions", json=completion(stream=True))
        full = await c.client.post("/v1/completions", json=completion())
    assert streamed.status_code == 200
    events = parse_sse(streamed.text)
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == TEXT[:4]
    assert events[-2]["error"]["code"] == "instance_error" and "fake decode crashed" in events[-2]["error"]["message"]
    assert events[-1] == "[DONE]"
    assert full.status_code == 502 and "fake decode crashed" in full.json()["error"]["message"]


async def test_decode_refusing_admission_sends_the_request_to_another(byte_model, byte_tokenizer):
    first, rest = script(byte_tokenizer, TEXT)
    full, spare = FakeDecode(rest, refuse_with=grpc.StatusCode.RESOURCE_EXHAUSTED), FakeDecode(rest)
    async with cluster(byte_model, [FakePrefill(first)], [full, spare]) as c:
        response = await c.client.post("/v1/completions", json=completion())
        full.refuse_with = spare.refuse_with = grpc.StatusCode.RESOURCE_EXHAUSTED
        refused = await c.client.post("/v1/completions", json=completion())
        instances_healthy = [i.healthy for i in c.pool.instances]
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == TEXT
    assert len(spare.generate_requests) == 1
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "insufficient_capacity"
    assert all(instances_healthy)  # a full instance is busy, not broken


async def test_unavailable_decode_is_marked_unhealthy_and_comes_back(byte_model, byte_tokenizer):
    first, rest = script(byte_tokenizer, TEXT)
    down, up = FakeDecode(rest), FakeDecode(rest)
    async with cluster(byte_model, [FakePrefill(first)], [down, up]) as c:
        down_instance = next(i for i in c.pool.instances if i.address == c.decode_addresses[0])
        await c.decode_servers[0].stop()
        responses = [await c.client.post("/v1/completions", json=completion()) for _ in range(3)]
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert down_instance.healthy is False and down_instance.failures == 1  # marked at once, not by the poll
        assert len(up.generate_requests) == 3 and down.generate_requests == []
        assert (await c.client.get("/ready")).status_code == 200  # the other decode still serves

        port = int(c.decode_addresses[0].rsplit(":", 1)[1])
        async with serve(down, port=port):
            await c.pool.poll_once()
            assert down_instance.healthy is True
        await c.decode_servers[1].stop()
        await c.pool.poll_once()
        ready = await c.client.get("/ready")
        no_decode = await c.client.post("/v1/completions", json=completion())
    assert ready.status_code == 503 and ready.json()["ready"] is False
    assert no_decode.status_code == 503 and no_decode.json()["error"]["code"] == "no_healthy_instance"


async def test_client_disconnect_mid_stream_cancels_on_the_decode(byte_model, byte_tokenizer):
    first, rest = script(byte_tokenizer, TEXT * 20)
    decode = FakeDecode(rest, token_delay_s=0.05)
    async with cluster(byte_model, [FakePrefill(first)], [decode]) as c:
        await leave_after_first_chunk(c.client, "/v1/completions", completion(stream=True, max_tokens=200))
        await eventually(lambda: decode.cancel_calls and decode.cancelled_streams)
    request_id = decode.generate_requests[0].request_id
    assert decode.cancel_calls == [request_id] and decode.cancelled_streams == [request_id]


@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_during_prefill_cancels_on_both_instances(byte_model, stream):
    prefill, decode = FakePrefill(EOS, delay_s=5.0), FakeDecode([EOS])
    async with cluster(byte_model, [prefill], [decode]) as c:
        async with httpx.AsyncClient(base_url=c.url) as client:
            request = asyncio.create_task(client.post("/v1/completions", json=completion(stream)))
            await eventually(lambda: prefill.requests)
            request.cancel()  # the client gives up: its connection closes
            with pytest.raises(asyncio.CancelledError):
                await request
        await eventually(lambda: prefill.cancel_calls and decode.cancel_calls)
        metrics = (await c.client.get("/metrics")).text
    request_id = prefill.requests[0].request_id
    assert prefill.cancel_calls == [request_id] and decode.cancel_calls == [request_id]
    assert 'hack_router_requests_total{status="cancelled"} 1.0' in metrics


@pytest.mark.parametrize("stream", [False, True])
async def test_a_silent_decode_instance_times_out_with_an_error(byte_model, byte_tokenizer, stream):
    """The KV was delivered but decode stalls: the client gets an explicit error and decode a Cancel."""
    first, rest = script(byte_tokenizer, TEXT)
    decode = FakeDecode(rest, token_delay_s=30.0)
    async with cluster(byte_model, [FakePrefill(first)], [decode], token_timeout_s=0.5) as c:
        response = await c.client.post("/v1/completions", json=completion(stream, max_tokens=50))
        await eventually(lambda: decode.cancel_calls)
    if stream:
        events = parse_sse(response.text)
        assert response.status_code == 200 and events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "decode_timeout"
    else:
        assert response.status_code == 504 and response.json()["error"]["code"] == "decode_timeout"
    assert decode.cancel_calls == [decode.generate_requests[0].request_id]
