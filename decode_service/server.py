"""The DecodeService gRPC servicer (grpc.aio): translates RPCs to the engine and engine events to messages."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from common.service import ServiceError, logprobs_to_proto, request_kv_mode, sampling_params
from decode_service.engine import DecodeEngine, StreamEnd, TokenEvent
from decode_service.kv_receiver import KVReceiver
from decode_service.scheduler import DecodeRequest, RequestState
from proto import hack_pb2, hack_pb2_grpc

_FINISH_REASONS = {None: hack_pb2.FINISH_REASON_NONE, "stop": hack_pb2.FINISH_REASON_STOP,
                   "length": hack_pb2.FINISH_REASON_LENGTH}


class DecodeServicer(hack_pb2_grpc.DecodeServiceServicer):
    def __init__(self, engine: DecodeEngine, identity: dict[str, str | int], kv_mode: str,
                 kv_address: str = "") -> None:
        self.engine, self.identity, self.kv_mode = engine, identity, kv_mode
        self.kv_address = kv_address  # advertised in Stats: where prefill instances push KV
        self._pushes: dict[str, KVReceiver] = {}  # the newest push of each request

    async def Generate(self, request: hack_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[hack_pb2.GenerateResponse]:
        try:
            choices, events = self._admit(request)
        except ServiceError as error:
            await context.abort(error.code, error.message)
        try:
            reserved = sum(choice.reserved_blocks for choice in choices)
            yield hack_pb2.GenerateResponse(admitted=hack_pb2.Admitted(reserved_kv_blocks=reserved))
            while True:
                event = await events.get()
                if isinstance(event, ServiceError):
                    await context.abort(event.code, event.message)
                if isinstance(event, StreamEnd):
                    return
                yield hack_pb2.GenerateResponse(token=_token_message(event))
        finally:  # the router went away (or the stream ended): nothing may keep the request's KV
            if any(choice.state is not RequestState.FINISHED for choice in choices):
                self.engine.fail_request(choices[0], ServiceError(
                    grpc.StatusCode.CANCELLED, f"request {request.request_id!r} was cancelled (its stream closed)"))

    def _admit(self, request: hack_pb2.GenerateRequest) -> tuple[list[DecodeRequest], asyncio.Queue]:
        request_kv_mode(request.kv_mode, self.kv_mode)
        if not request.request_id:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "request_id is empty")
        if request.max_tokens < 1:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"max_tokens must be >= 1, got {request.max_tokens}")
        context_window = self.engine.runner.loaded.config.context_window
        if request.prompt_len + request.max_tokens > context_window:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"prompt_len ({request.prompt_len}) plus max_tokens ({request.max_tokens}) exceeds "
                               f"the context window of {context_window} tokens")
        vocab_size = self.engine.runner.loaded.config.vocab_size
        params = sampling_params(request.sampling, request.max_tokens, tuple(request.stop_token_ids), vocab_size)
        return self.engine.admit(request.request_id, request.prompt_len, params, tuple(request.prompt_token_ids),
                                 request.n or 1)

    async def PushKV(self, request_iterator: AsyncIterator[hack_pb2.KVChunk],
                     context: grpc.aio.ServicerContext) -> hack_pb2.PushKVResponse:
        receiver = KVReceiver(self.engine, self.identity, self._pushes)
        try:
            result = await receiver.receive(request_iterator)
        except ServiceError as error:
            await context.abort(error.code, error.message)
        return hack_pb2.PushKVResponse(blocks_received=result.blocks_received, bytes_received=result.bytes_received)

    async def Cancel(self, request: hack_pb2.CancelRequest,
                     context: grpc.aio.ServicerContext) -> hack_pb2.CancelResponse:
        choice = request.choice if request.HasField("choice") else None
        return hack_pb2.CancelResponse(found=self.engine.cancel(request.request_id, choice))

    async def Stats(self, request: hack_pb2.StatsRequest,
                    context: grpc.aio.ServicerContext) -> hack_pb2.StatsResponse:
        scheduler = self.engine.scheduler
        return hack_pb2.StatsResponse(
            model=self.identity["model"],
            kv_mode=self.identity["kv_mode"],
            kv_block_size=self.identity["block_size"],
            total_kv_blocks=scheduler.total_blocks,
            free_kv_blocks=scheduler.free_blocks,
            used_kv_blocks=self.engine.runner.used_blocks,
            running_seqs=len(scheduler.running),
            waiting_seqs=scheduler.num_waiting,
            counters=self.engine.counters.to_proto(),
            kv_address=self.kv_address,
        )


def _token_message(event: TokenEvent) -> hack_pb2.GeneratedToken:
    message = hack_pb2.GeneratedToken(
        token_id=event.token_id,
        finish_reason=_FINISH_REASONS[event.finish_reason],
        timing=hack_pb2.TokenTiming(step_s=event.step_s, batch_size=event.batch_size),
        logprobs=logprobs_to_proto(event.logprobs),
        choice=event.choice,
    )
    if event.timers is not None:
        message.timers.CopyFrom(hack_pb2.DecodeTimers(**vars(event.timers)))
    return message


def add_to_server(servicer: DecodeServicer, server: grpc.aio.Server) -> None:
    hack_pb2_grpc.add_DecodeServiceServicer_to_server(servicer, server)
