"""What the prefill and decode services share: flags with HACK_* defaults, the model and KV setup, errors
as gRPC statuses, the sampling parameters of a request, and a grpc.aio server with the standard health service
that runs until SIGINT or SIGTERM, wrapped by run_service into each service's `main`.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.default_model import model_from_env
from common.grpc_security import TransportSecurity, security_from_args
from common.kv.config import KVConfig
from common.kv.format import WIRE_VERSION, KVLayout
from common.kv.options import add_kv_arguments
from common.loader import DTYPES, LoadedModel, load_model
from common.sampling import SamplingParams, TokenLogprobs
from common.structured import check_schema
from proto import hack_pb2, kv_mode_from_proto, kv_mode_to_proto

log = logging.getLogger(__name__)

# KV chunks are one page of one layer (well under the 4 MiB default), but a large model's page can exceed it.
GRPC_OPTIONS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]


class ServiceError(Exception):
    """A request failure with the gRPC status the caller should see."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


# ---------------------------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------------------------


def env(name: str, default: str | None = None) -> str | None:
    """The HACK_<name> environment variable (the default of the flag of the same name)."""
    return os.environ.get(f"HACK_{name}", default)


def add_model_args(parser: argparse.ArgumentParser, default_port: int) -> None:
    """Flags both services take; each defaults to its HACK_* environment variable."""
    parser.add_argument("--model", default=env("MODEL"),
                        help="checkpoint directory, .gguf file, hub id, or an embedded model: smollm2-135m-instruct "
                        "(the default) or tiny-random (env HACK_MODEL)")
    parser.add_argument("--host", default=env("HOST", "127.0.0.1"), help="address to listen on (env HACK_HOST)")
    parser.add_argument("--port", type=int, default=env("PORT", str(default_port)),
                        help=f"gRPC port, 0 = any free port (env HACK_PORT; default {default_port})")
    parser.add_argument("--device", default=env("DEVICE"), help="cpu or cuda (env HACK_DEVICE; default: cuda if "
                        "available)")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default=env("DTYPE", "auto"),
                        help="model compute dtype (env HACK_DTYPE)")
    parser.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"), help="env HACK_LOG_LEVEL")
    parser.add_argument("--drain-timeout", type=float, default=env("DRAIN_TIMEOUT_S", "30"),
                        help="on SIGTERM, seconds running requests get to finish before the instance exits "
                             "(new ones are refused at once; 0 = exit at once) (env HACK_DRAIN_TIMEOUT_S)")
    add_kv_arguments(parser)  # prefill and decode instances must agree on these


def load_service_model(args: argparse.Namespace) -> LoadedModel:
    return load_model(model_from_env(args.model), dtype=args.dtype, device=args.device)


def model_name(loaded: LoadedModel) -> str:
    """How instances name their model to each other: the checkpoint directory's name."""
    return loaded.path.name


def kv_identity(loaded: LoadedModel, layout: KVLayout) -> dict[str, str | int]:
    """The KVHeader fields a prefill instance sends and a decode instance requires to be equal to its own."""
    return {
        "model": model_name(loaded),
        "num_layers": loaded.config.num_layers,
        "num_kv_heads": layout.num_kv_heads,
        "head_dim": layout.head_dim,
        "kv_mode": kv_mode_to_proto(layout.config.mode),
        "format_version": WIRE_VERSION,
        "block_size": layout.config.block_size,
        "kv_format": layout.wire_identity,  # the cache options and the 16-bit dtype of uncompressed K/V
    }


def chunks_per_layer(layout: KVLayout, num_tokens: int) -> int:
    """KVBlocks one layer of a num_tokens prompt takes on the wire (wire.encode_layer): pages, then state."""
    return len(layout.page_token_counts(num_tokens)) + int(layout.config.compressed)


# ---------------------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------------------


def request_kv_mode(requested: int, served: str) -> str:
    """The KV mode a request asks for, checked against the one this instance serves (unset = served)."""
    if requested == hack_pb2.KV_MODE_UNSPECIFIED:
        return served
    try:
        mode = kv_mode_from_proto(requested)
    except ValueError as error:
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
    if mode != served:
        raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"this instance serves kv_mode {served!r}, the request asks for {mode!r}")
    return mode


def sampling_params(message: hack_pb2.SamplingParams, max_tokens: int = 1, stop_token_ids: tuple[int, ...] = (),
                    vocab_size: int | None = None) -> SamplingParams:
    """SamplingParams of a request; top_p = 0 and repetition_penalty = 0 mean unset (off), like every other zero
    field of the message. With vocab_size, token ids of logit_bias and stop_token_ids are checked against it."""
    bias = tuple(sorted(message.logit_bias.items()))
    if vocab_size is not None:
        bad = [t for t in (*(token for token, _ in bias), *stop_token_ids) if not 0 <= t < vocab_size]
        if bad:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"token ids {bad[:8]} are outside the vocabulary [0, {vocab_size})")
    try:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=message.temperature, top_p=message.top_p or 1.0,
            top_k=message.top_k, seed=message.seed if message.HasField("seed") else None,
            stop_token_ids=stop_token_ids, position_offset=message.position_offset,
            presence_penalty=message.presence_penalty, frequency_penalty=message.frequency_penalty,
            repetition_penalty=message.repetition_penalty or 1.0, logit_bias=bias, min_tokens=message.min_tokens,
            logprobs=message.logprobs if message.HasField("logprobs") else None,
            json_schema=message.json_schema if message.HasField("json_schema") else None,
        )
        if params.json_schema is not None:
            check_schema(params.json_schema)
        return params
    except ValueError as error:  # GrammarError included
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None


def logprobs_to_proto(logprobs: TokenLogprobs | None) -> hack_pb2.TokenLogprobs | None:
    if logprobs is None:
        return None
    return hack_pb2.TokenLogprobs(logprob=logprobs.logprob, top_token_ids=logprobs.top_ids,
                                  top_logprobs=logprobs.top_logprobs)


def logprobs_from_proto(message: hack_pb2.TokenLogprobs) -> TokenLogprobs:
    return TokenLogprobs(message.logprob, tuple(message.top_token_ids), tuple(message.top_logprobs))


@dataclass
class Counters:
    """Cumulative request counters of an instance (hack.v1.Counters)."""

    requests_total: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    kv_bytes: int = 0
    max_batch_size: int = 0

    def to_proto(self) -> hack_pb2.Counters:
        return hack_pb2.Counters(**vars(self))

    def count_failure(self, code: grpc.StatusCode) -> None:
        if code == grpc.StatusCode.CANCELLED:
            self.requests_cancelled += 1
        else:
            self.requests_failed += 1


def stats_identity(loaded: LoadedModel, kv_config: KVConfig) -> dict:
    """The StatsResponse fields that never change."""
    return {"model": model_name(loaded), "kv_mode": kv_mode_to_proto(kv_config.mode),
            "kv_block_size": kv_config.block_size}


# ---------------------------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------------------------


async def serve(
    register: Callable[[grpc.aio.Server], None],
    service_name: str,
    host: str,
    port: int,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    security: TransportSecurity | None = None,
    engine: "ServiceEngine | None" = None,
    drain_timeout_s: float = 0.0,
) -> None:
    """Serve until SIGINT/SIGTERM: `register` adds the servicers; health answers SERVING for "" and
    service_name once the port is bound. Logs "listening on host:port" (what hack-cluster waits for).

    The first signal drains: health turns NOT_SERVING (the router stops routing here), the engine admits
    nothing new, and running requests get up to drain_timeout_s to finish; a second signal cuts the drain short.
    """
    security = security or TransportSecurity()
    server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=security.interceptors())
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = security.bind(server, f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not listen on {host}:{port}")
    await server.start()
    for name in ("", service_name):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("%s listening on %s:%d%s", service_name, host, bound, " (TLS)" if security.tls_cert else "")
    signals = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    await signals.get()
    for name in ("", service_name):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if engine is not None and drain_timeout_s > 0:
        await _drain(engine, service_name, drain_timeout_s, signals)
    log.info("%s stopping", service_name)
    await server.stop(grace=2.0)
    if on_stop is not None:
        await on_stop()


async def _drain(engine: "ServiceEngine", service_name: str, timeout_s: float, signals: asyncio.Queue) -> None:
    """Admit nothing new; wait until the running requests are done, timeout_s passed or another signal came."""
    engine.begin_drain()
    log.info("%s draining: %d requests running, waiting up to %g s", service_name, engine.active_requests, timeout_s)
    deadline = time.monotonic() + timeout_s
    while engine.active_requests and time.monotonic() < deadline and signals.empty():
        await asyncio.sleep(0.05)
    if engine.active_requests:
        log.warning("%s stops with %d requests still running", service_name, engine.active_requests)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class ServiceEngine(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def begin_drain(self) -> None:
        """Refuse new requests with UNAVAILABLE from now on (requests already admitted carry on)."""

    @property
    def active_requests(self) -> int: ...


class Servicer(Protocol):
    """What run_service needs of a service's servicer: the engine it starts before serving and stops after."""

    engine: ServiceEngine


ServicerT = TypeVar("ServicerT", bound=Servicer)


def run_service(
    prog: str,
    build_servicer: Callable[[argparse.Namespace], ServicerT],
    add_to_server: Callable[[ServicerT, grpc.aio.Server], None],
    service_name: str,
    args: argparse.Namespace,
) -> int:
    """A service's whole life from parsed flags to exit status: build, serve until a signal, stop. A bad setting
    (ValueError) or an unusable port (OSError) prints "<prog>: error: ..." and returns 2, like a usage error."""
    configure_logging(args.log_level)

    async def run() -> None:
        if args.drain_timeout < 0:
            raise ValueError(f"--drain-timeout must be >= 0, got {args.drain_timeout}")
        security = security_from_args(args)
        servicer = build_servicer(args)
        await servicer.engine.start()
        await serve(lambda server: add_to_server(servicer, server), service_name, args.host, args.port,
                    on_stop=servicer.engine.stop, security=security, engine=servicer.engine,
                    drain_timeout_s=args.drain_timeout)

    try:
        asyncio.run(run())
    except (ValueError, OSError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return 0
