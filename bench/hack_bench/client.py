"""One streaming request to an OpenAI-compatible endpoint, timed from its SSE stream.

Works with `/v1/completions` and `/v1/chat/completions`. A request fails on an HTTP error status, a transport
error, an error event inside a 200 stream, a stream that ends without `data: [DONE]`, or a stream that carries
no content at all; `RequestOutput.error` then says which.
"""

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.hack_bench.records import BenchmarkError, RequestOutput, SampleRequest

DONE_SENTINEL = "[DONE]"
MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class EndpointConfig:
    """Where and how to send requests; validated on construction."""

    api_url: str
    model: str
    chat: bool = False
    ignore_eos: bool = False
    temperature: float = 0.0
    send_token_ids: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.api_url.startswith(("http://", "https://")):
            raise BenchmarkError(f"API URL must start with http:// or https://, got {self.api_url!r}")
        if self.chat and self.send_token_ids:
            raise BenchmarkError("token-id prompts need /v1/completions; chat messages must be text")
        if self.temperature < 0:
            raise BenchmarkError(f"--temperature must be >= 0, got {self.temperature}")


def endpoint_is_chat(endpoint: str) -> bool:
    """True for a chat-completions path, False for a completions path; anything else is an error."""
    path = endpoint.rstrip("/")
    if path.endswith("/chat/completions"):
        return True
    if path.endswith("/completions"):
        return False
    raise BenchmarkError(f"--endpoint must end with /completions or /chat/completions, got {endpoint!r}")


def build_payload(config: EndpointConfig, sample: SampleRequest) -> dict[str, Any]:
    """The JSON body for one streaming request (usage requested so output tokens are counted by the server)."""
    payload: dict[str, Any] = {
        "model": config.model,
        "temperature": config.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.chat:
        payload["messages"] = [{"role": "user", "content": sample.prompt}]
        payload["max_completion_tokens"] = sample.expected_output_len
    else:
        use_ids = config.send_token_ids and sample.prompt_token_ids is not None
        payload["prompt"] = sample.prompt_token_ids if use_ids else sample.prompt
        payload["max_tokens"] = sample.expected_output_len
    if config.ignore_eos:
        payload["ignore_eos"] = True
    payload.update(config.extra_body)
    return payload


async def send_request(
    client: httpx.AsyncClient, config: EndpointConfig, sample: SampleRequest, clock_origin: float
) -> RequestOutput:
    """Send one request and time it; never raises for server or network failures."""
    output = RequestOutput(prompt_len=sample.prompt_len)
    started = time.perf_counter()
    output.start_time = started - clock_origin
    try:
        async with client.stream("POST", config.api_url, json=build_payload(config, sample)) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", errors="replace")
                output.error = f"HTTP {response.status_code}: {error_message(body)}"
                return output
            await read_stream(response.aiter_lines(), output, started, config.chat)
    except httpx.HTTPError as exc:
        output.error = _shorten(f"{type(exc).__name__}: {exc}")
    return output


async def read_stream(lines: AsyncIterator[str], output: RequestOutput, started: float, chat: bool) -> None:
    """Fill `output` from the SSE lines of a 200 response."""
    last_chunk_at = started
    received_done = False
    async for event, data in sse_events(lines):
        if data.strip() == DONE_SENTINEL:
            received_done = True
            break
        chunk = _parse_chunk(data)
        if event == "error" or (chunk is not None and chunk.get("error") is not None):
            output.error = "error event in stream: " + error_message(data)
            return
        if chunk is None:
            output.error = "malformed stream chunk: " + _shorten(data)
            return
        text = chunk_text(chunk, chat)
        if text:
            now = time.perf_counter()
            if output.generated_text:
                output.itl.append(now - last_chunk_at)
            else:
                output.ttft = now - started
            last_chunk_at = now
            output.generated_text += text
        _read_usage(chunk, output)
    if not received_done:
        output.error = "stream ended without [DONE]"
    elif not output.generated_text:
        output.error = "stream finished without any content"
    else:
        output.success = True
        output.latency = last_chunk_at - started


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    """Server-sent events as (event name, data) pairs; multi-line data is joined with newlines."""
    event, data_lines = "message", []
    async for line in lines:
        if not line:
            if data_lines:
                yield event, "\n".join(data_lines)
            event, data_lines = "message", []
            continue
        if line.startswith(":"):
            continue  # SSE comment / keep-alive
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data_lines.append(value)
        elif name == "event":
            event = value
    if data_lines:
        yield event, "\n".join(data_lines)


def chunk_text(chunk: dict[str, Any], chat: bool) -> str:
    """The generated text carried by one stream chunk ('' for role-only or usage-only chunks)."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if chat:
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


def error_message(body: str) -> str:
    """The human-readable message of an OpenAI / FastAPI error body, else the body itself (shortened)."""
    try:
        parsed = json.loads(body)
    except json.JSONDecodeError:
        return _shorten(body.strip() or "(empty body)")
    if isinstance(parsed, dict):
        error = parsed.get("error", parsed)
        if isinstance(error, dict):
            error = error.get("message") or error.get("detail") or error
        return _shorten(str(error))
    return _shorten(str(parsed))


def _parse_chunk(data: str) -> dict[str, Any] | None:
    """A stream chunk as a dict; None when it is not a JSON object (treated as a stream error)."""
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError:
        return None
    return chunk if isinstance(chunk, dict) else None


def _read_usage(chunk: dict[str, Any], output: RequestOutput) -> None:
    usage = chunk.get("usage") or {}
    if usage.get("completion_tokens") is not None:
        output.output_tokens = int(usage["completion_tokens"])
    if output.prompt_len is None and usage.get("prompt_tokens") is not None:
        output.prompt_len = int(usage["prompt_tokens"])


def _shorten(message: str) -> str:
    return message if len(message) <= MAX_ERROR_CHARS else message[: MAX_ERROR_CHARS - 3] + "..."


async def list_models(client: httpx.AsyncClient, base_url: str) -> list[dict[str, Any]]:
    """The model entries of the server's /v1/models (id, and with vLLM-style servers root and max_model_len)."""
    url = f"{base_url}/v1/models"
    try:
        response = await client.get(url)
        response.raise_for_status()
        models = response.json().get("data") or []
    except (httpx.HTTPError, json.JSONDecodeError, AttributeError) as exc:
        raise BenchmarkError(f"cannot list models at {url} (is the server up?): {exc}") from exc
    if not models:
        raise BenchmarkError(f"{url} lists no model; pass --model")
    return models


async def first_model_id(client: httpx.AsyncClient, base_url: str) -> str:
    """The first model listed by the server's /v1/models (used when --model is not given)."""
    return str((await list_models(client, base_url))[0]["id"])


async def server_model_root(client: httpx.AsyncClient, base_url: str, model: str | None) -> str | None:
    """Where the server loads `model` (or its first model) from: the `root` of its /v1/models entry."""
    models = await list_models(client, base_url)
    entry = next((m for m in models if m.get("id") == model), models[0])
    return entry.get("root")
