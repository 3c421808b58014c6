"""Streams one request's KV to its decode instance (PushKV) while the prompt is still running.

The model thread feeds a queue with each layer's wire chunks as soon as the layer ran (`put_layer`, called on
the event loop); the PushKV request stream sends the header at once, every chunk as it arrives, paced by the
optional link token bucket, and the trailer with the first token once the forward is done (`finish`). `abort`
cancels the call, so the decode instance keeps the request waiting for another attempt.

With `after_forward` the chunks wait until the forward is done and then leave back to back (KV_PUSH_MODES):
the transfer that other disaggregated servers do (the KV moves once prefill finished), the ablation of the
layer-wise overlap, and a push whose time past the forward is the link's alone (scripts/netns-cluster.sh).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc

from common.grpc_security import TransportSecurity
from common.sampling import TokenLogprobs
from common.service import GRPC_OPTIONS, ServiceError, logprobs_to_proto
from prefill_service.token_bucket import TokenBucket
from proto import hack_pb2, hack_pb2_grpc


class DecodeRefused(ServiceError):
    """The decode instance refused the KV or could not be reached: the Prefill call fails with its status, marked
    (trailing metadata) so that the router blames the decode instance."""


KV_PUSH_MODES = ("layerwise", "after-forward")


@dataclass(frozen=True)
class SendResult:
    kv_bytes: int  # KVBlock.data bytes sent
    transfer_s: float  # PushKV opened -> decode instance acknowledged


@dataclass(frozen=True)
class _Layer:
    layer: int
    chunks: list[bytes]


@dataclass(frozen=True)
class _Trailer:
    first_tokens: tuple[int, ...]  # one per choice
    first_logprobs: tuple[TokenLogprobs | None, ...]

    def message(self) -> hack_pb2.KVTrailer:
        trailer = hack_pb2.KVTrailer(first_token=self.first_tokens[0],
                                     first_logprobs=logprobs_to_proto(self.first_logprobs[0]))
        if len(self.first_tokens) > 1:
            trailer.first_tokens.extend(self.first_tokens)
            if self.first_logprobs[0] is not None:
                trailer.first_tokens_logprobs.extend(map(logprobs_to_proto, self.first_logprobs))
        return trailer


class KVSender:
    def __init__(self, stub: hack_pb2_grpc.DecodeServiceStub, address: str, header: hack_pb2.KVHeader,
                 link: TokenBucket | None = None, after_forward: bool = False) -> None:
        self.stub, self.address, self.header, self.link = stub, address, header, link
        self._queue: asyncio.Queue[_Layer | _Trailer] = asyncio.Queue()
        self._forward_done = asyncio.Event()
        if not after_forward:
            self._forward_done.set()
        self._call: grpc.aio.StreamUnaryCall | None = None
        self._aborted = False
        self.kv_bytes = 0

    def put_layer(self, layer: int, chunks: list[bytes]) -> None:
        self._queue.put_nowait(_Layer(layer, chunks))

    def finish(self, *first_tokens: int, first_logprobs: Sequence[TokenLogprobs | None] = ()) -> None:
        """The forward is done: send the trailer with each choice's first token (and logprobs, when asked for) once
        the layers are out."""
        self._queue.put_nowait(_Trailer(first_tokens, tuple(first_logprobs) or (None,) * len(first_tokens)))
        self._forward_done.set()

    def abort(self) -> None:
        self._aborted = True
        if self._call is not None:
            self._call.cancel()

    async def run(self) -> SendResult:
        """Push everything and wait for the decode instance's answer; ServiceError with its status if refused."""
        start = time.monotonic()
        self._call = self.stub.PushKV(self._messages())
        if self._aborted:
            self._call.cancel()
        try:
            await self._call
        except asyncio.CancelledError:
            raise ServiceError(grpc.StatusCode.CANCELLED, "the KV push was cancelled") from None
        except grpc.aio.AioRpcError as error:
            raise DecodeRefused(error.code(), f"decode instance {self.address} refused the KV: "
                               f"{error.details() or error.code().name}") from None
        return SendResult(self.kv_bytes, time.monotonic() - start)

    async def _messages(self) -> AsyncIterator[hack_pb2.KVChunk]:
        yield hack_pb2.KVChunk(header=self.header)
        await self._forward_done.wait()  # at once, unless the chunks wait for the whole forward
        while True:
            item = await self._queue.get()
            if isinstance(item, _Trailer):
                yield hack_pb2.KVChunk(trailer=item.message())
                return
            for index, data in enumerate(item.chunks):
                if self.link is not None:
                    await self.link.acquire(len(data))
                self.kv_bytes += len(data)
                yield hack_pb2.KVChunk(block=self._block(item.layer, index, len(item.chunks), data))

    def _block(self, layer: int, index: int, num_chunks: int, data: bytes) -> hack_pb2.KVBlock:
        """wire.encode_layer's chunks are the layer's pages in order, then (compressed modes) its state."""
        if self.header.kv_mode != hack_pb2.KV_MODE_FP16 and index == num_chunks - 1:
            return hack_pb2.KVBlock(layer=layer, index=0, kind=hack_pb2.BLOCK_KIND_STATE, data=data)
        return hack_pb2.KVBlock(layer=layer, index=index, kind=hack_pb2.BLOCK_KIND_PAGE, data=data)


class DecodeStubs:
    """One channel per decode instance, opened on first use and kept for later pushes; each sends the internal
    token and uses TLS as `security` says."""

    def __init__(self, security: TransportSecurity | None = None) -> None:
        self._security = security or TransportSecurity()
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> hack_pb2_grpc.DecodeServiceStub:
        if address not in self._channels:
            self._channels[address] = self._security.channel(address, options=GRPC_OPTIONS)
        return hack_pb2_grpc.DecodeServiceStub(self._channels[address])

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
