"""A real prefill and a real decode servicer on free loopback ports, in the test's event loop.

Built through each service's own flag parsing and `build_servicer`, so the tests run what `hack-prefill` and
`hack-decode` run, minus the process boundary.
"""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from common.random_models import RandomModelSpec
from decode_service import main as decode_main
from decode_service.server import DecodeServicer
from prefill_service import main as prefill_main
from prefill_service.server import PrefillServicer
from proto import hack_pb2, hack_pb2_grpc

# A tiny random Llama with GQA, and a 32-token partition/page so short prompts span full and partial pages.
SPEC = RandomModelSpec(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=32, max_position_embeddings=256, seed=7)
KV_FLAGS = ("--partition", "32")


@dataclass
class Services:
    decode: DecodeServicer
    prefill: PrefillServicer
    decode_address: str
    prefill_address: str
    decode_stub: hack_pb2_grpc.DecodeServiceStub
    prefill_stub: hack_pb2_grpc.PrefillServiceStub

    async def decode_stats(self) -> hack_pb2.StatsResponse:
        return await self.decode_stub.Stats(hack_pb2.StatsRequest())


@contextlib.asynccontextmanager
async def run_services(model: Path, kv_mode: str = "hack", decode_flags: Sequence[str] = (),
                       prefill_flags: Sequence[str] = ()) -> AsyncIterator[Services]:
    common = ["--model", str(model), "--kv-mode", kv_mode, *KV_FLAGS, "--port", "0"]
    decode = decode_main.build_servicer(decode_main.parse_args([*common, *decode_flags]))
    prefill = prefill_main.build_servicer(prefill_main.parse_args([*common, *prefill_flags]))
    async with contextlib.AsyncExitStack() as stack:
        decode_address = await stack.enter_async_context(_serve(decode, decode_main.add_to_server))
        prefill_address = await stack.enter_async_context(_serve(prefill, prefill_main.add_to_server))
        decode_channel = await stack.enter_async_context(grpc.aio.insecure_channel(decode_address))
        prefill_channel = await stack.enter_async_context(grpc.aio.insecure_channel(prefill_address))
        yield Services(decode, prefill, decode_address, prefill_address,
                       hack_pb2_grpc.DecodeServiceStub(decode_channel),
                       hack_pb2_grpc.PrefillServiceStub(prefill_channel))


@contextlib.asynccontextmanager
async def _serve(servicer: DecodeServicer | PrefillServicer, add_to_server) -> AsyncIterator[str]:
    server = grpc.aio.server()
    add_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await servicer.engine.start()
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)
        await servicer.engine.stop()


def generate_request(request_id: str, prompt_len: int, max_tokens: int, **fields) -> hack_pb2.GenerateRequest:
    """Greedy, no stop tokens unless given."""
    return hack_pb2.GenerateRequest(request_id=request_id, prompt_len=prompt_len, max_tokens=max_tokens, **fields)


async def read_tokens(call: grpc.aio.UnaryStreamCall) -> list[hack_pb2.GeneratedToken]:
    """The token messages of a Generate stream after `admitted` (already read), until it ends."""
    tokens = []
    while (message := await call.read()) is not grpc.aio.EOF:
        tokens.append(message.token)
    return tokens


async def run_request(services: Services, request_id: str, prompt: list[int], max_tokens: int,
                      **fields) -> tuple[list[hack_pb2.GeneratedToken], hack_pb2.PrefillResponse]:
    """One request the way the router runs it: Generate (admitted), then Prefill, then read every token."""
    call = services.decode_stub.Generate(generate_request(request_id, len(prompt), max_tokens, **fields))
    assert (await call.read()).HasField("admitted")
    response = await services.prefill_stub.Prefill(hack_pb2.PrefillRequest(
        request_id=request_id, token_ids=prompt, decode_address=services.decode_address))
    return await read_tokens(call), response
