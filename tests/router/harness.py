"""Run the real router app (uvicorn, free loopback port, this event loop) in front of fake prefill/decode gRPC
servers (fake_instances.py). The model directory is the byte-level random checkpoint, so no ../shared is needed."""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI
from transformers import PreTrainedTokenizerBase

from common.grpc_security import TransportSecurity
from router.app import build_app
from router.config import RouterConfig
from router.instances import InstancePool
from tests.router.fake_instances import FakeDecode, FakePrefill, Running, serve

EOS = 2  # </s> of the byte tokenizer
STARTUP_TIMEOUT_S = 10.0


def script(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[int, list[int]]:
    """(first token, continuation ending in EOS) that decode to `text`."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return ids[0], [*ids[1:], EOS]


@dataclass
class Cluster:
    url: str
    app: FastAPI
    client: httpx.AsyncClient
    prefills: list[FakePrefill]
    decodes: list[FakeDecode]
    prefill_servers: list[Running]
    decode_servers: list[Running]
    config: RouterConfig

    @property
    def prefill_addresses(self) -> list[str]:
        return [server.address for server in self.prefill_servers]

    @property
    def decode_addresses(self) -> list[str]:
        return [server.address for server in self.decode_servers]

    @property
    def pool(self) -> InstancePool:
        return self.app.state.pool


@contextlib.asynccontextmanager
async def run_router(config: RouterConfig, **app_options: object) -> AsyncIterator[tuple[str, FastAPI]]:
    """The router app served by uvicorn on a free loopback port, in this event loop."""
    app = build_app(config, **app_options)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    async with asyncio.timeout(STARTUP_TIMEOUT_S):
        while not server.started:
            if task.done():
                task.result()  # startup failed: raise its error
            await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        await task
        sock.close()


@contextlib.asynccontextmanager
async def cluster(
    model_dir: Path, prefills: list[FakePrefill], decodes: list[FakeDecode],
    server_security: TransportSecurity | None = None, **config: object
) -> AsyncIterator[Cluster]:
    async with contextlib.AsyncExitStack() as stack:
        prefill_servers = [await stack.enter_async_context(serve(p, security=server_security)) for p in prefills]
        decode_servers = [await stack.enter_async_context(serve(d, security=server_security)) for d in decodes]
        settings = dict(model=str(model_dir), prefill_addresses=tuple(s.address for s in prefill_servers),
                        decode_addresses=tuple(s.address for s in decode_servers), served_model_name="byte-model",
                        health_interval_s=60.0, rpc_timeout_s=1.0)  # tests poll with pool.poll_once()
        router_config = RouterConfig(**(settings | config))
        url, app = await stack.enter_async_context(run_router(router_config))
        client = await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=10.0))
        yield Cluster(url, app, client, prefills, decodes, prefill_servers, decode_servers, router_config)


def parse_sse(body: str) -> list[dict | str]:
    """The `data:` payloads of an SSE body: JSON objects, and the final "[DONE]"."""
    events = [event.removeprefix("data: ") for event in body.split("\n\n") if event]
    return [event if event == "[DONE]" else json.loads(event) for event in events]


async def leave_after_first_chunk(client: httpx.AsyncClient, url: str, body: dict) -> None:
    """Stream a request and hang up once its first SSE chunk arrived (a client gone mid-stream)."""
    async with client.stream("POST", url, json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                return  # leaving the block closes the connection


async def eventually(condition: Callable[[], object], timeout_s: float = 3.0) -> None:
    """Wait until condition() is truthy (things the router does in the background, like Cancel RPCs)."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)
