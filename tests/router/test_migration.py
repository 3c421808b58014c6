"""Request migration: a decode instance that fails mid-request hands the request to another one, which resumes
from prompt + the tokens already streamed (fake instances that follow the contract, driven over HTTP)."""
from __future__ import annotations

import grpc
import pytest

from tests.router.fake_instances import FakeDecode, FakePrefill
from tests.router.harness import cluster, parse_sse

pytestmark = pytest.mark.anyio

TEXT = " the quick brown fox jumps over the lazy dog."


def completion(stream: bool = True, **fields: object) -> dict:
    return {"model": "byte-model", "prompt": "Once", "max_tokens": 100, "stream": stream, "seed": 7, **fields}


def scripted(tokenizer, **broken: object) -> tuple[FakePrefill, FakeDecode, FakeDecode, list[int]]:
    """A prefill that resumes the script at any position, a decode failing as `broken` says, and a healthy one."""
    ids = [*tokenizer(TEXT, add_special_tokens=False).input_ids, 2]
    return FakePrefill(ids[0], script=ids), FakeDecode(ids[1:], **broken), FakeDecode(ids[1:]), ids


def streamed_text(body: str) -> tuple[str, list]:
    events = parse_sse(body)
    return "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict) and "choices" in e), events


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL])
async def test_a_decode_failing_mid_stream_is_resumed_on_another(byte_model, byte_tokenizer, code):
    prefill, broken, spare, ids = scripted(byte_tokenizer, fail_after_tokens=5, fail_code=code)
    prompt = byte_tokenizer("Once").input_ids
    async with cluster(byte_model, [prefill], [broken, spare]) as c:
        response = await c.client.post("/v1/completions", json=completion())
        metrics = (await c.client.get("/metrics")).text
    text, events = streamed_text(response.text)
    assert response.status_code == 200 and text == TEXT and events[-1] == "[DONE]"
    assert not any("error" in e for e in events if isinstance(e, dict))
    first, resumed = broken.generate_requests[0], spare.generate_requests[0]
    assert resumed.request_id == f"{first.request_id}-m1"
    assert resumed.prompt_len == len(prompt) + 5 and resumed.max_tokens == 100 - 5
    assert resumed.sampling.position_offset == 5 and resumed.sampling.seed == 7
    assert list(prefill.requests[1].token_ids) == prompt + ids[:5]  # prefill runs the prompt + streamed tokens
    assert "hack_router_migrations_total 1.0" in metrics


async def test_a_non_streaming_request_is_migrated_too(byte_model, byte_tokenizer):
    prefill, broken, spare, _ = scripted(byte_tokenizer, fail_after_tokens=3, fail_code=grpc.StatusCode.UNAVAILABLE)
    async with cluster(byte_model, [prefill], [broken, spare]) as c:
        response = await c.client.post("/v1/completions", json=completion(stream=False))
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == TEXT
    assert response.json()["usage"]["completion_tokens"] == len(byte_tokenizer(TEXT, add_special_tokens=False)
                                                                 .input_ids) + 1


async def test_a_silent_decode_is_left_for_another(byte_model, byte_tokenizer):
    prefill, silent, spare, _ = scripted(byte_tokenizer, token_delay_s=30.0)
    async with cluster(byte_model, [prefill], [silent, spare], token_timeout_s=0.5) as c:
        response = await c.client.post("/v1/completions", json=completion())
    text, _ = streamed_text(response.text)
    assert text == TEXT
    assert silent.cancel_calls == [silent.generate_requests[0].request_id]  # the stuck one frees the request


async def test_a_decode_refusing_the_kv_is_blamed_not_the_prefill(byte_model, byte_tokenizer):
    prefill, refusing, spare, _ = scripted(byte_tokenizer, refuse_kv_with=grpc.StatusCode.UNAVAILABLE)
    async with cluster(byte_model, [prefill], [refusing, spare]) as c:
        response = await c.client.post("/v1/completions", json=completion())
        health = {i.address: i.healthy for i in c.pool.instances}
    text, _ = streamed_text(response.text)
    assert text == TEXT
    assert health[c.prefill_addresses[0]] is True and health[c.decode_addresses[0]] is False


async def test_migrations_are_bounded_and_end_in_an_error_event(byte_model, byte_tokenizer):
    ids = [*byte_tokenizer(TEXT, add_special_tokens=False).input_ids, 2]
    decodes = [FakeDecode(ids[1:], fail_after_tokens=2, fail_code=grpc.StatusCode.UNAVAILABLE) for _ in range(3)]
    async with cluster(byte_model, [FakePrefill(ids[0], script=ids)], decodes, max_migrations=1) as c:
        response = await c.client.post("/v1/completions", json=completion())
    text, events = streamed_text(response.text)
    assert text == TEXT[:4]  # two tokens on each of the two attempts, none repeated
    error = events[-2]["error"]
    assert error["code"] == "instance_unavailable" and "already migrated 1 times" in error["message"]
    assert [len(d.generate_requests) for d in decodes].count(1) == 2


async def test_no_spare_decode_ends_in_an_error_event(byte_model, byte_tokenizer):
    prefill, broken, _, _ = scripted(byte_tokenizer, fail_after_tokens=2, fail_code=grpc.StatusCode.UNAVAILABLE)
    async with cluster(byte_model, [prefill], [broken]) as c:
        response = await c.client.post("/v1/completions", json=completion())
        whole = await c.client.post("/v1/completions", json=completion(stream=False))
    _, events = streamed_text(response.text)
    assert "no other healthy decode instance" in events[-2]["error"]["message"] and events[-1] == "[DONE]"
    assert whole.status_code == 503


async def test_a_request_error_from_the_decode_is_not_migrated(byte_model, byte_tokenizer):
    prefill, broken, spare, _ = scripted(byte_tokenizer, fail_after_tokens=2,
                                         fail_code=grpc.StatusCode.INVALID_ARGUMENT)
    async with cluster(byte_model, [prefill], [broken, spare]) as c:
        response = await c.client.post("/v1/completions", json=completion())
    _, events = streamed_text(response.text)
    assert events[-2]["error"]["code"] == "rejected_by_instance" and spare.generate_requests == []
