"""The router over HTTP, in front of fake prefill/decode gRPC servers: the happy paths and the error bodies."""
from __future__ import annotations

import pytest

from tests.router.fake_instances import FakeDecode, FakePrefill
from tests.router.harness import EOS, cluster, eventually, parse_sse, script

pytestmark = pytest.mark.anyio

STORY = " there was a dog named Rex. He liked naïve cafés 😀."


async def test_completion_returns_the_decoded_story_and_usage(byte_model, byte_tokenizer):
    first, rest = script(byte_tokenizer, STORY)
    prefill, decode = FakePrefill(first), FakeDecode(rest)
    async with cluster(byte_model, [prefill], [decode]) as c:
        response = await c.client.post("/v1/completions", json={
            "model": "byte-model", "prompt": "Once upon a time", "max_tokens": 100, "temperature": 0.5,
            "top_k": 7, "seed": 3, "kv_mode": "dequant"})
    assert response.status_code == 200, response.text
    body = response.json()
    prompt_ids = byte_tokenizer("Once upon a time").input_ids
    assert body["object"] == "text_completion" and body["model"] == "byte-model"
    assert body["choices"][0]["text"] == STORY
    assert body["choices"][0]["finish_reason"] == "stop"
    completion_tokens = len(rest) + 1  # EOS counts, as in vLLM
    assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens,
                             "total_tokens": len(prompt_ids) + completion_tokens}
    generate = decode.generate_requests[0]
    assert list(prefill.requests[0].token_ids) == prompt_ids
    assert prefill.requests[0].decode_address == c.decode_addresses[0]
    assert generate.request_id == prefill.requests[0].request_id == body["id"]
    assert generate.prompt_len == len(prompt_ids) and generate.max_tokens == 100
    assert list(generate.stop_token_ids) == [EOS]
    assert generate.sampling.top_k == 7 and generate.sampling.seed == 3
    assert generate.sampling.temperature == pytest.approx(0.5)
    assert generate.kv_mode == prefill.requests[0].kv_mode == 2  # KV_MODE_DEQUANT
    assert decode.cancel_calls == []  # finished normally: nothing to cancel


async def test_streaming_completion_sends_chunks_usage_and_done(byte_model, byte_tokenizer):
    first, rest = script(byte_tokenizer, STORY)
    async with cluster(byte_model, [FakePrefill(first)], [FakeDecode(rest)]) as c:
        response = await c.client.post("/v1/completions", json={
            "model": "byte-model", "prompt": "Once", "max_tokens": 9, "stream": True,
            "stream_options": {"include_usage": True}})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    assert events[-1] == "[DONE]"
    usage_chunk, text_chunks = events[-2], events[:-2]
    assert "".join(chunk["choices"][0]["text"] for chunk in text_chunks) == STORY.encode()[:9].decode()
    assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in text_chunks[:-1])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 9
    assert "usage" not in text_chunks[0]


async def test_chat_completion_applies_the_chat_template(byte_model, byte_tokenizer):
    first, rest = script(byte_tokenizer, "Hi!")
    prefill = FakePrefill(first)
    async with cluster(byte_model, [prefill], [FakeDecode(rest)]) as c:
        messages = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
        response = await c.client.post("/v1/chat/completions", json={
            "model": "byte-model", "messages": messages, "max_completion_tokens": 20})
        stream = await c.client.post("/v1/chat/completions", json={
            "model": "byte-model", "messages": messages, "stream": True})
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hi!"}
    expected_prompt = byte_tokenizer("<s>system: Be brief.\n<s>user: Hello\n<s>assistant: ",
                                     add_special_tokens=False).input_ids
    assert list(prefill.requests[0].token_ids) == expected_prompt
    assert body["usage"]["prompt_tokens"] == len(expected_prompt)
    events = parse_sse(stream.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-1]) == "Hi!"
    assert events[-2]["choices"][0]["finish_reason"] == "stop" and events[-1] == "[DONE]"


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_string_truncates_and_cancels_on_decode(byte_model, byte_tokenizer, stream):
    first, rest = script(byte_tokenizer, STORY)
    decode = FakeDecode(rest, token_delay_s=0.002)
    async with cluster(byte_model, [FakePrefill(first)], [decode]) as c:
        response = await c.client.post("/v1/completions", json={
            "model": "byte-model", "prompt": "Once", "max_tokens": 200, "stop": ["zzz", "Rex"],
            "stream": stream})
        await eventually(lambda: decode.cancel_calls)
    if stream:
        events = parse_sse(response.text)
        text = "".join(e["choices"][0]["text"] for e in events[:-1])
        finish = events[-2]["choices"][0]["finish_reason"]
    else:
        text, finish = response.json()["choices"][0]["text"], response.json()["choices"][0]["finish_reason"]
    assert text == " there was a dog named " and finish == "stop"
    assert decode.cancel_calls == [decode.generate_requests[0].request_id]


async def test_ignore_eos_and_stop_token_ids_reach_the_decode_instance(byte_model, byte_tokenizer):
    first, rest = script(byte_tokenizer, "ab")
    decode = FakeDecode(rest)
    async with cluster(byte_model, [FakePrefill(first)], [decode]) as c:
        stop_id = byte_tokenizer("b", add_special_tokens=False).input_ids[0]
        response = await c.client.post("/v1/completions", json={
            "model": "byte-model", "prompt": "x", "max_tokens": 5, "ignore_eos": True, "stop_token_ids": [stop_id]})
    assert list(decode.generate_requests[0].stop_token_ids) == [stop_id]
    choice = response.json()["choices"][0]
    assert choice == {"index": 0, "text": "a", "logprobs": None, "finish_reason": "stop"}  # stop token not shown
    assert response.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    ("payload", "status", "param"),
    [
        ({"prompt": "hi"}, 400, "model"),
        ({"model": "byte-model"}, 400, "prompt"),
        ({"model": "other", "prompt": "hi"}, 404, "model"),
        ({"model": "byte-model", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "byte-model", "prompt": "hi", "max_tokens": 600}, 400, "max_tokens"),
        ({"model": "byte-model", "prompt": "x" * 600}, 400, "prompt"),
        ({"model": "byte-model", "prompt": [], "max_tokens": 3}, 400, "prompt"),
        ({"model": "byte-model", "prompt": [1, 9999]}, 400, "prompt"),
        ({"model": "byte-model", "prompt": "hi", "n": 17}, 400, "n"),
        ({"model": "byte-model", "prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
        ({"model": "byte-model", "prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
        ({"model": "byte-model", "prompt": "hi", "ignore_eos": "yes"}, 400, "ignore_eos"),
        ({"model": "byte-model", "prompt": "hi", "stop_token_ids": [-5]}, 400, "stop_token_ids.0"),
        ({"model": "byte-model", "prompt": "hi", "stop_token_ids": [9999]}, 400, "stop_token_ids"),
        ({"model": "byte-model", "prompt": "hi", "top_k": 2147483648}, 400, "top_k"),
        ({"model": "byte-model", "prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias"),
        ({"model": "byte-model", "prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
        ({"model": "byte-model", "prompt": "hi", "logit_bias": {"9999": 1}}, 400, "logit_bias"),
        ({"model": "byte-model", "prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty"),
        ({"model": "byte-model", "prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
        ({"model": "byte-model", "prompt": "hi", "logprobs": 21}, 400, "logprobs"),
        ({"model": "byte-model", "prompt": "hi", "best_of": 2}, 400, None),
        ({"model": "byte-model", "prompt": "hi", "stream_options": {"include_usage": "yes"}, "stream": True},
         400, "stream_options.include_usage"),
        ({"model": "byte-model", "prompt": "hi", "response_format": {"type": "xml"}}, 400, "response_format.type"),
        ({"model": "byte-model", "prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "objectx"}}}}, 400, "response_format"),
        ({"model": "byte-model", "prompt": "hi", "temperature": -1}, 400, "temperature"),
        ({"model": "byte-model", "prompt": "hi", "kv_mode": "int4"}, 400, "kv_mode"),
        ({"model": "byte-model", "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ],
)
async def test_invalid_requests_get_openai_error_bodies(byte_model, payload, status, param):
    decode = FakeDecode([EOS])
    async with cluster(byte_model, [FakePrefill(EOS)], [decode]) as c:
        response = await c.client.post("/v1/completions", json=payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert decode.generate_requests == []  # rejected before reaching any instance


async def test_malformed_json_and_unknown_routes(byte_model):
    async with cluster(byte_model, [FakePrefill(EOS)], [FakeDecode([EOS])]) as c:
        malformed = await c.client.post("/v1/completions", content=b'{"model": "byte-model", "prompt": ',
                                        headers={"content-type": "application/json"})
        chat_without_messages = await c.client.post("/v1/chat/completions", json={"model": "byte-model",
                                                                                   "messages": []})
        unknown = await c.client.get("/v1/nothing")
    assert malformed.status_code == 400
    assert malformed.json()["error"]["message"] == "the request body is not valid JSON"
    assert chat_without_messages.status_code == 400 and chat_without_messages.json()["error"]["param"] == "messages"
    assert unknown.status_code == 404 and unknown.json()["error"]["message"] == "Not Found"


async def test_models_health_ready_and_metrics(byte_model, byte_tokenizer):
    first, rest = script(byte_tokenizer, "ok")
    async with cluster(byte_model, [FakePrefill(first)], [FakeDecode(rest)]) as c:
        await c.client.post("/v1/completions", json={"model": "byte-model", "prompt": "a", "max_tokens": 4})
        models = (await c.client.get("/v1/models")).json()
        health = await c.client.get("/health")
        ready = await c.client.get("/ready")
        metrics = (await c.client.get("/metrics")).text
    assert models["data"][0]["id"] == "byte-model" and models["data"][0]["max_model_len"] == 512
    assert health.status_code == 200
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert 'hack_router_requests_total{status="success"} 1.0' in metrics
    assert "hack_router_time_to_first_token_seconds_count 1.0" in metrics
    assert "hack_router_inter_token_latency_seconds_count 2.0" in metrics  # 3 tokens: "o", "k", EOS
    assert "hack_router_kv_transfer_bytes_total" in metrics and "hack_router_kv_transfer_seconds_count 1.0" in metrics
    assert f'hack_router_instance_healthy{{address="{c.decode_addresses[0]}",role="decode"}} 1.0' in metrics
    assert f'hack_router_decode_free_kv_blocks{{address="{c.decode_addresses[0]}"}} 1000.0' in metrics


async def test_unknown_fields_are_ignored_and_named_and_chat_max_tokens_0_is_refused(byte_model, byte_tokenizer):
    first, rest = script(byte_tokenizer, "ok")
    async with cluster(byte_model, [FakePrefill(first)], [FakeDecode(rest)]) as c:
        accepted = await c.client.post("/v1/completions", json={
            "model": "byte-model", "prompt": "hi", "max_tokens": 5, "a_future_field": 1, "another": [1]})
        not_latin1 = await c.client.post("/v1/completions", json={  # a header value must be latin-1 (fuzzing found it)
            "model": "byte-model", "prompt": "hi", "max_tokens": 5, "\u0100": None})
        refused = await c.client.post("/v1/chat/completions", json={
            "model": "byte-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0})
    assert accepted.status_code == 200 and accepted.json()["choices"][0]["text"] == "ok"
    assert accepted.headers["x-ignored-fields"] == "a_future_field, another"
    assert not_latin1.status_code == 200 and not_latin1.headers["x-ignored-fields"] == "\\u0100"
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"
