"""PushKV ingest: a prefill instance streams one admitted request's KV into this instance's pool.

A push moves through explicit states:

    EXPECT_HEADER ──header ok──> RECEIVING ──trailer, every layer imported──> COMPLETE
          │                          │
          └──── refused (bad header or block, request gone, superseded, early end) ──> FAILED

The header is checked against the admitted request and this instance (model, shape, KV mode, format version)
and the prompt's pages are allocated, within the request's admission reservation, before any block is read.
Blocks are collected per layer; a complete layer is verified (checksum, version, layout: `wire.decode_layer`)
and staged on the engine's import thread while the next layer's blocks arrive, then written into the pool by
the model thread between decode steps (`DecodeEngine.import_layer`).

A refused push fails its request with the same status, so Generate ends with it (DATA_LOSS for a checksum
mismatch, FAILED_PRECONDITION for another model, layout or format version). Two cases leave the request waiting:
a push superseded by a newer one for the same request (a retry: the newer header replaces what this one stored),
and a push that stops before its trailer. gRPC ends a stream whose sender cancelled (a prefill instance that died
or gave up) exactly like one that ended, so the two cannot be told apart here; either way the prefill side's
Prefill call fails, and the router retries elsewhere or cancels the request. The KV-transfer timeout bounds the wait.
"""
from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from common.kv.interface import KVCacheFull
from common.kv.wire import WireChecksumError, WireFormatError
from common.sampling import TokenLogprobs
from common.service import ServiceError, chunks_per_layer, logprobs_from_proto
from decode_service.engine import DecodeEngine
from decode_service.scheduler import DecodeRequest, RequestState
from proto import hack_pb2


class PushEndedEarly(ServiceError):
    """The push stream ended before its trailer (its sender stopped or cancelled)."""


class PushState(enum.Enum):
    EXPECT_HEADER = "expect_header"
    RECEIVING = "receiving"
    COMPLETE = "complete"
    FAILED = "failed"


@dataclass
class PushResult:
    blocks_received: int
    bytes_received: int


@dataclass
class KVReceiver:
    engine: DecodeEngine
    identity: dict[str, str | int]  # common.service.kv_identity of this instance
    active: dict[str, "KVReceiver"]  # the newest push of each request, shared by all receivers
    state: PushState = PushState.EXPECT_HEADER
    request: DecodeRequest | None = None
    superseded: bool = False  # a newer push for the same request took over
    chunks_per_layer: int = 0
    layers: dict[int, list[bytes]] = field(default_factory=dict)
    imports: list[asyncio.Future] = field(default_factory=list)
    result: PushResult = field(default_factory=lambda: PushResult(0, 0))

    async def receive(self, stream: AsyncIterator[hack_pb2.KVChunk]) -> PushResult:
        try:
            async for message in stream:
                await self._on_message(message)
            if self.request is not None:
                self._check_still_current()
            if self.state is not PushState.COMPLETE:
                raise PushEndedEarly(grpc.StatusCode.INVALID_ARGUMENT, f"the push ended in state {self.state.value}, "
                                     "before its trailer")
            return self.result
        except ServiceError as error:
            self._refuse(error)
            raise
        except asyncio.CancelledError:  # the prefill instance went away: a retry may push again
            self.state = PushState.FAILED
            raise
        finally:
            if self.request is not None and self.active.get(self.request.request_id) is self:
                del self.active[self.request.request_id]

    async def _on_message(self, message: hack_pb2.KVChunk) -> None:
        kind = message.WhichOneof("chunk")
        if self.request is not None:
            self._check_still_current()
        expected = {PushState.EXPECT_HEADER: ("header",), PushState.RECEIVING: ("block", "trailer")}
        if kind not in expected.get(self.state, ()):
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected {kind} in push state {self.state.value}")
        if kind == "header":
            await self._on_header(message.header)
        else:
            if kind == "block":
                self._on_block(message.block)
            else:
                await self._on_trailer(message.trailer)

    async def _on_header(self, header: hack_pb2.KVHeader) -> None:
        choices = self.engine.scheduler.get(header.request_id)
        if choices is None:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"no admitted request {header.request_id!r}")
        self.request = request = choices[0]  # the KV lands in the first choice's pages, then is copied (fork_kv)
        if request.state is not RequestState.WAITING_FOR_KV:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"request {header.request_id!r} already has its KV ({request.state.value})")
        self._check_header(header, request)
        previous = self.active.get(request.request_id)
        if previous is not None:
            previous.superseded = True  # its next message is refused with ABORTED
        self.active[request.request_id] = self
        self.chunks_per_layer = chunks_per_layer(self.engine.runner.layout, header.num_tokens)
        try:
            await self.engine.on_model_thread(self.engine.runner.allocate, request.seq_id, header.num_tokens)
        except KVCacheFull as error:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"no room for the KV: {error}") from None
        self.state = PushState.RECEIVING

    def _check_header(self, header: hack_pb2.KVHeader, request: DecodeRequest) -> None:
        if header.format_version != self.identity["format_version"]:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"KV format version {header.format_version} is not this instance's "
                               f"{self.identity['format_version']}")
        mismatched = [f"{name} {getattr(header, name)!r} != {ours!r}" for name, ours in self.identity.items()
                      if getattr(header, name) != ours]
        if mismatched:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               "the KV does not fit this instance: " + ", ".join(mismatched))
        if header.num_tokens != request.prompt_len:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"the KV holds {header.num_tokens} tokens, the request was admitted for "
                               f"{request.prompt_len}")
        expected_blocks = self.identity["num_layers"] * chunks_per_layer(self.engine.runner.layout, header.num_tokens)
        if header.num_blocks != expected_blocks:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"{header.num_tokens} tokens take {expected_blocks} blocks, the header announces "
                               f"{header.num_blocks}")

    def _on_block(self, block: hack_pb2.KVBlock) -> None:
        if not 0 <= block.layer < self.identity["num_layers"]:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"block for layer {block.layer} of "
                               f"{self.identity['num_layers']}")
        chunks = self.layers.setdefault(block.layer, [])
        if len(chunks) == self.chunks_per_layer:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"layer {block.layer} got more than its "
                               f"{self.chunks_per_layer} blocks")
        chunks.append(block.data)
        self.result.blocks_received += 1
        self.result.bytes_received += len(block.data)
        self.engine.counters.kv_bytes += len(block.data)
        if len(chunks) == self.chunks_per_layer:
            self.imports.append(asyncio.ensure_future(self.engine.import_layer(self.request, block.layer, chunks)))
        self._raise_import_error(done_only=True)

    async def _on_trailer(self, trailer: hack_pb2.KVTrailer) -> None:
        complete = sum(len(c) == self.chunks_per_layer for c in self.layers.values())
        if complete != self.identity["num_layers"]:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"trailer after {complete} of "
                               f"{self.identity['num_layers']} complete layers")
        await asyncio.gather(*self.imports, return_exceptions=True)
        self._raise_import_error(done_only=False)
        self._check_still_current()
        first_tokens, first_logprobs = self._first_tokens(trailer)
        try:
            await self.engine.fork_kv(self.request)
        except KVCacheFull as error:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"no room for the choices' KV: {error}") from None
        self._check_still_current()
        self.state = PushState.COMPLETE
        self.engine.kv_ready(self.request, first_tokens, first_logprobs)

    def _first_tokens(self, trailer: hack_pb2.KVTrailer) -> tuple[list[int], list[TokenLogprobs | None]]:
        """Each choice's first token (and logprobs) from the trailer, checked against the request."""
        n = len(self.engine.scheduler.get(self.request.request_id) or ())
        tokens = list(trailer.first_tokens) if n > 1 else [trailer.first_token]
        if len(tokens) != n:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"the trailer carries {len(tokens)} first tokens "
                               f"for the request's {n} choices")
        vocab_size = self.engine.runner.loaded.config.vocab_size
        bad = [token for token in tokens if not 0 <= token < vocab_size]
        if bad:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"first token {bad[0]} is outside the vocabulary "
                               f"[0, {vocab_size})")
        if n > 1:
            logprobs = [logprobs_from_proto(lp) for lp in trailer.first_tokens_logprobs] or [None] * n
        else:
            logprobs = [logprobs_from_proto(trailer.first_logprobs) if trailer.HasField("first_logprobs") else None]
        if len(logprobs) != n:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"the trailer carries {len(logprobs)} first "
                               f"logprobs for the request's {n} choices")
        return tokens, logprobs

    def _raise_import_error(self, done_only: bool) -> None:
        for future in self.imports:
            if (future.done() or not done_only) and future.exception() is not None:
                error = future.exception()
                if isinstance(error, ServiceError):
                    raise error
                if isinstance(error, WireChecksumError):
                    raise ServiceError(grpc.StatusCode.DATA_LOSS, f"KV block refused: {error}")
                if isinstance(error, WireFormatError):
                    raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"KV block refused: {error}")
                raise ServiceError(grpc.StatusCode.INTERNAL, f"KV import failed: {error}")

    def _check_still_current(self) -> None:
        """Refuse to store anything for a request that ended or whose KV a newer push now owns."""
        if self.superseded:
            raise ServiceError(grpc.StatusCode.ABORTED, "a newer push for this request replaced this one")
        if self.state is not PushState.COMPLETE and self.request.state is not RequestState.WAITING_FOR_KV:
            raise ServiceError(grpc.StatusCode.CANCELLED,
                               f"request {self.request.request_id!r} ended before its KV arrived")

    def _refuse(self, error: ServiceError) -> None:
        request_waits = error.code == grpc.StatusCode.ABORTED or isinstance(error, PushEndedEarly)
        self.state = PushState.FAILED
        if self.request is not None and not request_waits:
            self.engine.fail(self.request, error)
