"""The streaming request function of bench.hack_bench.client, against the fake SSE server."""

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from bench.hack_bench.client import (
    EndpointConfig,
    build_payload,
    endpoint_is_chat,
    error_message,
    first_model_id,
    send_request,
    sse_events,
)
from bench.hack_bench.records import BenchmarkError, RequestOutput, SampleRequest

FAKE_MODEL = "fake-model"


def _send(server, sample: SampleRequest, **endpoint_fields) -> RequestOutput:
    chat = endpoint_fields.pop("chat", False)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    endpoint = EndpointConfig(api_url=server.base_url + path, model=FAKE_MODEL, chat=chat, **endpoint_fields)

    async def go() -> RequestOutput:
        async with httpx.AsyncClient(timeout=10) as client:
            return await send_request(client, endpoint, sample, clock_origin=time.perf_counter())

    return asyncio.run(go())


def _assert_streamed(output: RequestOutput, tokens: int) -> None:
    assert output.success, output.error
    assert output.error == ""
    assert output.generated_text == "".join(f" t{i}" for i in range(tokens))
    assert output.output_tokens == tokens
    assert len(output.itl) == tokens - 1
    assert all(gap > 0 for gap in output.itl)
    assert 0 < output.ttft <= output.latency
    assert output.latency == pytest.approx(output.ttft + sum(output.itl))


def test_completion_stream_is_timed_per_chunk(server) -> None:
    output = _send(server, SampleRequest("w1 w2 w3", 3, 17), ignore_eos=True)
    _assert_streamed(output, tokens=17)
    assert output.prompt_len == 3
    sent = server.payloads[-1]
    assert sent["prompt"] == "w1 w2 w3" and sent["max_tokens"] == 17
    assert sent["ignore_eos"] is True and sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}


def test_chat_stream_skips_the_role_chunk(server) -> None:
    output = _send(server, SampleRequest("w1", 1, 5), chat=True)
    _assert_streamed(output, tokens=5)
    sent = server.payloads[-1]
    assert sent["messages"] == [{"role": "user", "content": "w1"}]
    assert sent["max_completion_tokens"] == 5
    assert "ignore_eos" not in sent


def test_token_id_prompt_and_prompt_len_from_usage(server) -> None:
    output = _send(server, SampleRequest("w1 w2", None, 1, prompt_token_ids=[4, 5]), send_token_ids=True)
    _assert_streamed(output, tokens=1)
    assert server.payloads[-1]["prompt"] == [4, 5]
    assert output.prompt_len == 2  # taken from usage.prompt_tokens


def test_http_error_status_is_a_failure(server) -> None:
    output = _send(server, SampleRequest("w1 HTTP400", 2, 4))
    assert not output.success
    assert output.error == "HTTP 400: prompt rejected"


def test_unknown_model_is_a_failure(server) -> None:
    endpoint = EndpointConfig(api_url=server.base_url + "/v1/completions", model="other-model")

    async def go() -> RequestOutput:
        async with httpx.AsyncClient() as client:
            return await send_request(client, endpoint, SampleRequest("w1", 1, 2), time.perf_counter())

    output = asyncio.run(go())
    assert (output.success, output.error) == (False, "HTTP 404: model other-model not found")


def test_error_event_inside_a_200_stream_is_a_failure(server) -> None:
    output = _send(server, SampleRequest("w1 MIDSTREAM_ERROR", 2, 9))
    assert not output.success
    assert output.error == "error event in stream: decode worker crashed"
    assert output.generated_text == " t0 t1"  # what arrived before the error is kept for inspection


def test_stream_without_done_is_a_failure(server) -> None:
    output = _send(server, SampleRequest("NO_DONE w2", 2, 3), chat=True)
    assert not output.success
    assert output.error == "stream ended without [DONE]"


def test_unreachable_server_is_a_failure() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket closes

    class Closed:
        base_url = f"http://127.0.0.1:{port}"

    output = _send(Closed, SampleRequest("w1", 1, 2))
    assert not output.success
    assert output.error.startswith("ConnectError")


def test_first_model_id_lists_the_server(server) -> None:
    async def go() -> str:
        async with httpx.AsyncClient() as client:
            return await first_model_id(client, server.base_url)

    assert asyncio.run(go()) == FAKE_MODEL


async def _lines(*lines: str) -> AsyncIterator[str]:
    for line in lines:
        yield line


def test_sse_events_handle_comments_names_and_multiline_data() -> None:
    async def collect() -> list[tuple[str, str]]:
        stream = _lines(
            ": keep-alive", 'data: {"a": 1}', "", "event: error", "data: line1", "data:line2", "", "data: tail"
        )
        return [event async for event in sse_events(stream)]

    assert asyncio.run(collect()) == [("message", '{"a": 1}'), ("error", "line1\nline2"), ("message", "tail")]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"error": {"message": "too long", "code": 400}}', "too long"),
        ('{"detail": "Not Found"}', "Not Found"),
        ('{"error": "overloaded"}', "overloaded"),
        ("upstream connect error", "upstream connect error"),
        ("", "(empty body)"),
    ],
)
def test_error_message_extraction(body: str, message: str) -> None:
    assert error_message(body) == message


def test_payload_uses_text_when_no_token_ids_are_known() -> None:
    endpoint = EndpointConfig(api_url="http://h/v1/completions", model="m", send_token_ids=True, temperature=0.7)
    payload = build_payload(endpoint, SampleRequest("w1", None, 3))
    assert (payload["prompt"], payload["temperature"], payload["max_tokens"]) == ("w1", 0.7, 3)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"api_url": "localhost:8000/v1/completions"}, "http://"),
        ({"chat": True, "send_token_ids": True}, "token-id prompts"),
        ({"temperature": -1.0}, "temperature"),
    ],
)
def test_endpoint_config_is_validated(fields: dict, message: str) -> None:
    with pytest.raises(BenchmarkError, match=message):
        EndpointConfig(**{"api_url": "http://h/v1/completions", "model": "m", **fields})


def test_endpoint_kind_from_path() -> None:
    assert endpoint_is_chat("/v1/chat/completions") and not endpoint_is_chat("/v1/completions/")
    with pytest.raises(BenchmarkError, match="--endpoint"):
        endpoint_is_chat("/v1/embeddings")
