"""n choices through the router (fake instances that follow the contract): one Generate and one Prefill for all
of them, each choice shaped on its own (stop strings, index, usage), a stopped choice cancelled alone on the
decode instance, and a migration after tokens resuming each choice as its own request."""
from __future__ import annotations

import grpc
import pytest

from tests.router.fake_instances import FakeDecode, FakePrefill
from tests.router.harness import EOS, cluster, eventually, leave_after_first_chunk, parse_sse

pytestmark = pytest.mark.anyio

TEXT = " the quick fox."


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def completion(**fields: object) -> dict:
    return {"model": "byte-model", "prompt": "Once", "max_tokens": 100, "n": 3, "seed": 7, **fields}


async def test_n_choices_run_as_one_prefill_and_one_generate(byte_model, byte_tokenizer):
    heads = [ids(byte_tokenizer, c)[0] for c in "abc"]
    prefill = FakePrefill(heads[0], choice_first_tokens=heads)
    decode = FakeDecode([*ids(byte_tokenizer, TEXT), EOS])
    async with cluster(byte_model, [prefill], [decode]) as c:
        response = await c.client.post("/v1/completions", json=completion())
        streamed = await c.client.post("/v1/chat/completions", json={
            "model": "byte-model", "messages": [{"role": "user", "content": "hi"}], "n": 3, "stream": True,
            "stream_options": {"include_usage": True}})
    body = response.json()
    assert [choice["index"] for choice in body["choices"]] == [0, 1, 2]
    assert [choice["text"] for choice in body["choices"]] == [head + TEXT for head in "abc"]
    prompt_len = len(byte_tokenizer("Once").input_ids)
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 3 * (len(TEXT) + 2),
                             "total_tokens": prompt_len + 3 * (len(TEXT) + 2)}
    assert len(prefill.requests) == 2 and [r.n for r in prefill.requests] == [3, 3]
    assert [r.n for r in decode.generate_requests] == [3, 3]
    assert prefill.requests[0].sampling.seed == 7  # the services derive each choice's seed (seed + i)
    events = [e for e in parse_sse(streamed.text) if isinstance(e, dict)]
    texts, finished = ["", "", ""], {}
    for event in events[:-1]:
        (choice,) = event["choices"]
        texts[choice["index"]] += choice["delta"].get("content", "")
        if choice["finish_reason"]:
            finished[choice["index"]] = choice["finish_reason"]
    assert texts == [head + TEXT for head in "abc"] and finished == {0: "stop", 1: "stop", 2: "stop"}
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3 * (len(TEXT) + 2)


async def test_a_stop_string_ends_one_choice_and_cancels_it_alone(byte_model, byte_tokenizer):
    heads = [ids(byte_tokenizer, c)[0] for c in "aXb"]
    prefill = FakePrefill(heads[0], choice_first_tokens=heads)
    decode = FakeDecode([*ids(byte_tokenizer, TEXT), EOS], token_delay_s=0.02)
    async with cluster(byte_model, [prefill], [decode]) as c:
        response = await c.client.post("/v1/completions", json=completion(stop=["X"]))
        await eventually(lambda: decode.cancelled_choices)
    choices = response.json()["choices"]
    assert [(ch["text"], ch["finish_reason"]) for ch in choices] == [
        ("a" + TEXT, "stop"), ("", "stop"), ("b" + TEXT, "stop")]
    assert decode.cancelled_choices == [(decode.generate_requests[0].request_id, 1)]


async def test_after_a_migration_each_choice_resumes_as_its_own_request(byte_model, byte_tokenizer):
    script = [*ids(byte_tokenizer, TEXT), EOS]
    prefill = FakePrefill(script[0], script=script)
    broken = FakeDecode(script[1:], fail_after_tokens=3, fail_code=grpc.StatusCode.UNAVAILABLE)
    spare = FakeDecode(script[1:])
    async with cluster(byte_model, [prefill], [broken, spare]) as c:
        response = await c.client.post("/v1/completions", json=completion(n=2, stream=True))
    events = [e for e in parse_sse(response.text) if isinstance(e, dict)]
    texts = ["", ""]
    for event in events:
        for choice in event["choices"]:
            texts[choice["index"]] += choice["text"]
    assert texts == [TEXT, TEXT] and not any("error" in e for e in events)
    first = broken.generate_requests[0]
    resumed = sorted(spare.generate_requests, key=lambda r: r.request_id)
    assert [r.request_id for r in resumed] == [f"{first.request_id}-c0-m1", f"{first.request_id}-c1-m1"]
    assert [r.sampling.seed for r in resumed] == [7, 8] and all(r.n == 1 for r in resumed)
    assert all(r.sampling.position_offset == 3 for r in resumed)


async def test_a_client_gone_mid_stream_cancels_every_choice_at_once(byte_model, byte_tokenizer):
    decode = FakeDecode([*ids(byte_tokenizer, TEXT * 20), EOS], token_delay_s=0.05)
    async with cluster(byte_model, [FakePrefill(ids(byte_tokenizer, "a")[0])], [decode]) as c:
        await leave_after_first_chunk(c.client, "/v1/completions", completion(stream=True, max_tokens=300))
        # the stream would run 15 s; 10 s bounds how late the disconnect is noticed on a loaded CI machine (took
        # over 3 s once in a full run, 1.6 s alone)
        await eventually(lambda: decode.cancel_calls and decode.cancelled_streams, timeout_s=10.0)
    request_id = decode.generate_requests[0].request_id
    assert decode.cancel_calls == [request_id] and decode.cancelled_streams == [request_id]
    assert decode.cancelled_choices == []  # one Cancel for the request, not one per choice
