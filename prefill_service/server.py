"""The PrefillService gRPC servicer (grpc.aio): validates a request, hands it to the engine, reports timings."""
from __future__ import annotations

import asyncio

import grpc

from common.sequence import validate_prompt
from common.sampling import MAX_CHOICES, MAX_LOGPROBS
from common.service import ServiceError, logprobs_to_proto, request_kv_mode, sampling_params
from prefill_service.engine import PrefillEngine
from prefill_service.kv_sender import DecodeRefused
from proto import FAILED_ROLE_METADATA_KEY, hack_pb2, hack_pb2_grpc


class PrefillServicer(hack_pb2_grpc.PrefillServiceServicer):
    def __init__(self, engine: PrefillEngine, kv_mode: str, context_window: int, vocab_size: int) -> None:
        self.engine, self.kv_mode = engine, kv_mode
        self.context_window, self.vocab_size = context_window, vocab_size

    async def Prefill(self, request: hack_pb2.PrefillRequest,
                      context: grpc.aio.ServicerContext) -> hack_pb2.PrefillResponse:
        try:
            self._validate(request)
            params = sampling_params(request.sampling, stop_token_ids=tuple(request.stop_token_ids),
                                     vocab_size=self.vocab_size)
            prompt_logprobs = request.prompt_logprobs if request.HasField("prompt_logprobs") else None
            result = await self.engine.prefill(request.request_id, list(request.token_ids), params,
                                               request.decode_address, prompt_logprobs, request.n or 1)
        except ServiceError as error:
            blame = ((FAILED_ROLE_METADATA_KEY, "decode"),) if isinstance(error, DecodeRefused) else ()
            await context.abort(error.code, error.message, trailing_metadata=blame)
        except asyncio.CancelledError:  # the router gave up on this call
            self.engine.cancel(request.request_id)
            raise
        timings = hack_pb2.PrefillTimings(queue_s=result.queue_s, prefill_compute_s=result.compute_s,
                                          kv_transfer_s=result.transfer_s, kv_bytes=result.kv_bytes)
        return hack_pb2.PrefillResponse(first_token=result.first_tokens[0], timings=timings,
                                        prompt_logprobs=map(logprobs_to_proto, result.prompt_logprobs or ()),
                                        first_tokens=result.first_tokens if len(result.first_tokens) > 1 else ())

    def _validate(self, request: hack_pb2.PrefillRequest) -> None:
        request_kv_mode(request.kv_mode, self.kv_mode)
        if not request.request_id:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "request_id is empty")
        if not request.decode_address:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "decode_address is empty")
        if request.n > MAX_CHOICES:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"n must be <= {MAX_CHOICES}, got {request.n}")
        if request.HasField("prompt_logprobs") and request.prompt_logprobs > MAX_LOGPROBS:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"prompt_logprobs must be <= {MAX_LOGPROBS}, got {request.prompt_logprobs}")
        try:  # the first token must fit in the context window too
            validate_prompt(list(request.token_ids), 1, self.context_window, self.vocab_size)
        except ValueError as error:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None

    async def Cancel(self, request: hack_pb2.CancelRequest,
                     context: grpc.aio.ServicerContext) -> hack_pb2.CancelResponse:
        return hack_pb2.CancelResponse(found=self.engine.cancel(request.request_id))

    async def Stats(self, request: hack_pb2.StatsRequest,
                    context: grpc.aio.ServicerContext) -> hack_pb2.StatsResponse:
        identity = self.engine.identity
        return hack_pb2.StatsResponse(model=identity["model"], kv_mode=identity["kv_mode"],
                                      kv_block_size=identity["block_size"], prefill_queue_len=self.engine.queue_len,
                                      counters=self.engine.counters.to_proto())


def add_to_server(servicer: PrefillServicer, server: grpc.aio.Server) -> None:
    hack_pb2_grpc.add_PrefillServiceServicer_to_server(servicer, server)
