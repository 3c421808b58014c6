"""Fake prefill and decode instances that speak proto/hack.proto, for router tests.

They follow the real contract end to end: the fake decode admits a request, waits for its KV, then streams
the first token (from the KV header) and a scripted continuation; the fake prefill pushes a header and one
checksummed block to the decode address it is given, as a real prefill instance does. With n > 1 every choice
follows the same script (its first token from the trailer's first_tokens), interleaved. Knobs make them fail
the ways the router must handle, and they record what reached them (requests, Cancel calls, cancellations).
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.grpc_security import TransportSecurity
from proto import DECODE_SERVICE_NAME, FAILED_ROLE_METADATA_KEY, PREFILL_SERVICE_NAME, hack_pb2, hack_pb2_grpc

Context = grpc.aio.ServicerContext
BLOCK_SIZE = 16
KV_WAIT_TIMEOUT_S = 5.0


@dataclass
class FakeDecode(hack_pb2_grpc.DecodeServiceServicer):
    continuation: Sequence[int]  # tokens after the first one (which comes from the prefill)
    token_delay_s: float = 0.0
    refuse_with: grpc.StatusCode | None = None  # fail Generate before admitting
    fail_after_tokens: int | None = None  # abort the stream (fail_code) after this many tokens
    fail_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    refuse_kv_with: grpc.StatusCode | None = None  # fail PushKV (the request's Generate too) with this code
    free_kv_blocks: int = 1000
    kv_mode: int = hack_pb2.KV_MODE_UNSPECIFIED  # what Stats reports; unspecified: the router routes any mode here
    kv_address: str = ""  # advertised in Stats
    generate_requests: list[hack_pb2.GenerateRequest] = field(default_factory=list)
    cancel_calls: list[str] = field(default_factory=list)
    cancelled_choices: list[tuple[str, int]] = field(default_factory=list)  # Cancel calls for one choice
    cancelled_streams: list[str] = field(default_factory=list)  # Generate calls the client cancelled
    kv_headers: list[hack_pb2.KVHeader] = field(default_factory=list)
    _waiting: dict[str, asyncio.Future[list[int]]] = field(default_factory=dict)
    _stopped: dict[str, set[int]] = field(default_factory=dict)  # choices cancelled one by one

    async def Generate(
        self, request: hack_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[hack_pb2.GenerateResponse]:
        if self.refuse_with is not None:
            await context.abort(self.refuse_with, "fake decode refuses")
        self.generate_requests.append(request)
        first_token = self._waiting[request.request_id] = asyncio.get_running_loop().create_future()
        try:
            yield hack_pb2.GenerateResponse(
                admitted=hack_pb2.Admitted(reserved_kv_blocks=math.ceil(request.prompt_len / BLOCK_SIZE))
            )
            try:
                tokens = await asyncio.wait_for(first_token, KV_WAIT_TIMEOUT_S)
            except asyncio.TimeoutError:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no KV arrived")
            except RuntimeError:
                await context.abort(self.refuse_kv_with, "fake decode refused the KV")
            # A resumed (migrated) request continues the script where the first attempt stopped.
            continuation = self.continuation[request.sampling.position_offset:]
            stopped = self._stopped.setdefault(request.request_id, set())
            async for message in self._tokens(request, [[token, *continuation] for token in tokens], stopped,
                                              context):
                yield message
        except asyncio.CancelledError:
            self.cancelled_streams.append(request.request_id)
            raise
        finally:
            self._waiting.pop(request.request_id, None)
            self._stopped.pop(request.request_id, None)

    async def _tokens(
        self, request: hack_pb2.GenerateRequest, scripts: list[list[int]], stopped: set[int], context: Context
    ) -> AsyncIterator[hack_pb2.GenerateResponse]:
        finished: set[int] = set()
        for count in range(1, len(scripts[0]) + 1):
            if self.fail_after_tokens is not None and count > self.fail_after_tokens:
                await context.abort(self.fail_code, "fake decode crashed")
            for choice, script in enumerate(scripts):
                if choice in finished or choice in stopped:
                    continue
                token = script[count - 1]
                finish = hack_pb2.FINISH_REASON_NONE
                if token in request.stop_token_ids:
                    finish = hack_pb2.FINISH_REASON_STOP
                elif count == request.max_tokens:
                    finish = hack_pb2.FINISH_REASON_LENGTH
                message = hack_pb2.GeneratedToken(
                    token_id=token, finish_reason=finish, choice=choice,
                    timing=hack_pb2.TokenTiming(step_s=0.001 if count > 1 else 0.0, batch_size=int(count > 1)),
                )
                if finish != hack_pb2.FINISH_REASON_NONE:
                    finished.add(choice)
                    message.timers.CopyFrom(hack_pb2.DecodeTimers(kv_wait_s=0.002, queue_s=0.001, decode_s=0.01,
                                                                  num_steps=count - 1, max_batch_size=1))
                yield hack_pb2.GenerateResponse(token=message)
            if len(finished | stopped) == len(scripts):
                return
            await asyncio.sleep(self.token_delay_s)
        await context.abort(grpc.StatusCode.INTERNAL, "fake decode ran out of scripted tokens")

    async def PushKV(
        self, request_iterator: AsyncIterator[hack_pb2.KVChunk], context: Context
    ) -> hack_pb2.PushKVResponse:
        header, first_token, blocks, num_bytes = None, None, 0, 0
        if self.refuse_kv_with is not None:
            for waiting in self._waiting.values():
                if not waiting.done():
                    waiting.set_exception(RuntimeError("the KV was refused"))
            await context.abort(self.refuse_kv_with, "fake decode refuses the KV")
        async for chunk in request_iterator:
            if chunk.HasField("header"):
                header = chunk.header
                continue
            if chunk.HasField("trailer"):
                first_token = list(chunk.trailer.first_tokens) or [chunk.trailer.first_token]
                continue
            data = chunk.block.data
            if zlib.crc32(data[:-4]) != int.from_bytes(data[-4:], "little"):
                await context.abort(grpc.StatusCode.DATA_LOSS, "KV block checksum mismatch")
            blocks, num_bytes = blocks + 1, num_bytes + len(data)
        if header is None or header.request_id not in self._waiting:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no admitted request for this KV")
        self.kv_headers.append(header)
        self._waiting[header.request_id].set_result(first_token)
        return hack_pb2.PushKVResponse(blocks_received=blocks, bytes_received=num_bytes)

    async def Cancel(self, request: hack_pb2.CancelRequest, context: Context) -> hack_pb2.CancelResponse:
        if request.HasField("choice"):
            self.cancelled_choices.append((request.request_id, request.choice))
            self._stopped.get(request.request_id, set()).add(request.choice)
        else:
            self.cancel_calls.append(request.request_id)
        return hack_pb2.CancelResponse(found=request.request_id in self._waiting)

    async def Stats(self, request: hack_pb2.StatsRequest, context: Context) -> hack_pb2.StatsResponse:
        return hack_pb2.StatsResponse(model="fake", kv_mode=self.kv_mode, kv_block_size=BLOCK_SIZE,
                                      total_kv_blocks=self.free_kv_blocks, free_kv_blocks=self.free_kv_blocks,
                                      running_seqs=len(self._waiting), kv_address=self.kv_address)


@dataclass
class FakePrefill(hack_pb2_grpc.PrefillServiceServicer):
    first_token: int
    script: Sequence[int] = ()  # when set, the first token of a request resumed at output position i is script[i]
    choice_first_tokens: Sequence[int] = ()  # n > 1: each choice's first token (default: first_token for all)
    fail_with: grpc.StatusCode | None = None
    delay_s: float = 0.0
    push_security: TransportSecurity | None = None  # token and TLS of its PushKV channel, as a real prefill's
    requests: list[hack_pb2.PrefillRequest] = field(default_factory=list)
    cancel_calls: list[str] = field(default_factory=list)

    async def Prefill(self, request: hack_pb2.PrefillRequest, context: Context) -> hack_pb2.PrefillResponse:
        self.requests.append(request)
        if self.fail_with is not None:
            await context.abort(self.fail_with, "fake prefill fails")
        await asyncio.sleep(self.delay_s)
        block = _fake_block(len(request.token_ids))
        header = hack_pb2.KVHeader(request_id=request.request_id, num_tokens=len(request.token_ids), model="fake",
                                   kv_mode=request.kv_mode, format_version=1, block_size=BLOCK_SIZE, num_blocks=1)
        first_token = self.script[request.sampling.position_offset] if self.script else self.first_token
        first_tokens = list(self.choice_first_tokens[:request.n]) or [first_token] * request.n
        trailer = hack_pb2.KVTrailer(first_token=first_tokens[0], first_tokens=first_tokens if request.n > 1 else ())
        async with (self.push_security or TransportSecurity()).channel(request.decode_address) as channel:
            stub = hack_pb2_grpc.DecodeServiceStub(channel)
            try:
                await stub.PushKV(iter([hack_pb2.KVChunk(header=header), hack_pb2.KVChunk(block=block),
                                        hack_pb2.KVChunk(trailer=trailer)]))
            except grpc.aio.AioRpcError as error:  # relay the decode's refusal, as the contract says
                await context.abort(error.code(), f"decode refused the KV: {error.details()}",
                                    trailing_metadata=((FAILED_ROLE_METADATA_KEY, "decode"),))
        timings = hack_pb2.PrefillTimings(prefill_compute_s=0.003, kv_transfer_s=0.002, kv_bytes=len(block.data))
        return hack_pb2.PrefillResponse(first_token=first_token, timings=timings)

    async def Cancel(self, request: hack_pb2.CancelRequest, context: Context) -> hack_pb2.CancelResponse:
        self.cancel_calls.append(request.request_id)
        return hack_pb2.CancelResponse(found=False)

    async def Stats(self, request: hack_pb2.StatsRequest, context: Context) -> hack_pb2.StatsResponse:
        return hack_pb2.StatsResponse(model="fake", prefill_queue_len=0)


def _fake_block(num_tokens: int) -> hack_pb2.KVBlock:
    payload = bytes(range(256))[: num_tokens % 256] + b"kv"
    data = payload + zlib.crc32(payload).to_bytes(4, "little")
    return hack_pb2.KVBlock(layer=0, index=0, kind=hack_pb2.BLOCK_KIND_PAGE, data=data)


@dataclass
class Running:
    address: str
    server: grpc.aio.Server

    async def stop(self) -> None:
        await self.server.stop(grace=None)


@contextlib.asynccontextmanager
async def serve(servicer: FakeDecode | FakePrefill, port: int = 0,
                security: TransportSecurity | None = None) -> AsyncIterator[Running]:
    """Run `servicer` (plus the health service) on a loopback port (0: any free one); `security` adds the
    internal token check and TLS, as the real services do."""
    security = security or TransportSecurity()
    server = grpc.aio.server(interceptors=security.interceptors())
    if isinstance(servicer, FakeDecode):
        hack_pb2_grpc.add_DecodeServiceServicer_to_server(servicer, server)
        name = DECODE_SERVICE_NAME
    else:
        hack_pb2_grpc.add_PrefillServiceServicer_to_server(servicer, server)
        name = PREFILL_SERVICE_NAME
    health_servicer = health.aio.HealthServicer()
    for service in ("", name):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = security.bind(server, f"127.0.0.1:{port}")
    await server.start()
    try:
        yield Running(f"127.0.0.1:{bound}", server)
    finally:
        await server.stop(grace=None)
