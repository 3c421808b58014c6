"""Who may talk to the prefill and decode services: an internal token on every RPC, and optional TLS.

    HACK_INTERNAL_TOKEN=secret     prefill and decode refuse any RPC without `authorization: Bearer secret`
                                   (UNAUTHENTICATED); the router and prefill send it. The health service stays
                                   open so probes need no secret. Environment only: a flag would show in `ps`.
    --tls-cert/--tls-key           the server's certificate chain and key (PEM): the gRPC port speaks TLS
    --tls-ca                       the CA (PEM) a client trusts for the instances' certificates: its channels use TLS

Every process builds one `TransportSecurity` from its flags and uses it for its server (`bind`, `interceptors`)
and for its channels (`channel`), so the token and the certificates are configured in one place.
"""
from __future__ import annotations

import argparse
import hmac
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

TOKEN_ENV = "HACK_INTERNAL_TOKEN"
_AUTH_KEY = "authorization"
_OPEN_SERVICES = ("/grpc.health.v1.Health/",)  # probes (kubelet, docker, the router's poll) carry no secret


@dataclass(frozen=True)
class TransportSecurity:
    internal_token: str = ""
    tls_cert: str = ""  # server: certificate chain (PEM file)
    tls_key: str = ""  # server: private key (PEM file)
    tls_ca: str = ""  # client: CA bundle (PEM file) that signed the instances' certificates

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        for name in ("tls_cert", "tls_key", "tls_ca"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ValueError(f"--{name.replace('_', '-')} {path!r} is not a readable file")

    # -- server side -------------------------------------------------------------------------------------------

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [TokenCheck(self.internal_token)] if self.internal_token else []

    def bind(self, server: grpc.aio.Server, address: str) -> int:
        """Add the listening port (TLS when a certificate is configured); returns the bound port (0 = failed)."""
        if not self.tls_cert:
            return server.add_insecure_port(address)
        credentials = grpc.ssl_server_credentials([(_read(self.tls_key), _read(self.tls_cert))])
        return server.add_secure_port(address, credentials)

    # -- client side -------------------------------------------------------------------------------------------

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        """An aio channel to an instance that sends the token on every call and uses TLS when a CA is set."""
        interceptors = _token_senders(self.internal_token) if self.internal_token else None
        if self.tls_ca:
            credentials = grpc.ssl_channel_credentials(root_certificates=_read(self.tls_ca))
            return grpc.aio.secure_channel(address, credentials, options=list(options), interceptors=interceptors)
        return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)


def add_transport_args(parser: argparse.ArgumentParser, server: bool, client: bool) -> None:
    """TLS flags (each defaults to its HACK_TLS_* variable); the token comes from HACK_INTERNAL_TOKEN only."""
    group = parser.add_argument_group("transport security (internal token: env HACK_INTERNAL_TOKEN)")
    if server:
        group.add_argument("--tls-cert", default=os.environ.get("HACK_TLS_CERT", ""),
                           help="serve gRPC over TLS with this certificate chain (PEM) [HACK_TLS_CERT]")
        group.add_argument("--tls-key", default=os.environ.get("HACK_TLS_KEY", ""),
                           help="the private key (PEM) of --tls-cert [HACK_TLS_KEY]")
    if client:
        group.add_argument("--tls-ca", default=os.environ.get("HACK_TLS_CA", ""),
                           help="connect to the instances over TLS, trusting this CA (PEM) [HACK_TLS_CA]")


def security_from_args(args: argparse.Namespace) -> TransportSecurity:
    return TransportSecurity(internal_token=os.environ.get(TOKEN_ENV, ""), tls_cert=getattr(args, "tls_cert", ""),
                             tls_key=getattr(args, "tls_key", ""), tls_ca=getattr(args, "tls_ca", ""))


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# The token on the wire
# ---------------------------------------------------------------------------------------------------------------


class TokenCheck(grpc.aio.ServerInterceptor):
    """Refuses every RPC (but health) whose `authorization` metadata is not `Bearer <token>` (constant time)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN_SERVICES) or self._authorized(details):
            return handler
        return _refusing(handler)

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        sent = next((value for key, value in details.invocation_metadata or () if key == _AUTH_KEY), "")
        sent_bytes = sent.encode() if isinstance(sent, str) else sent
        return hmac.compare_digest(sent_bytes, self._expected)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that fails the call with UNAUTHENTICATED."""
    async def refuse(_request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong internal token (HACK_INTERNAL_TOKEN)")

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def _with_token(details: grpc.aio.ClientCallDetails, header: tuple[str, str]) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()), header)
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                      details.wait_for_ready)


def _token_senders(token: str) -> list[grpc.aio.ClientInterceptor]:
    header = (_AUTH_KEY, f"Bearer {token}")

    class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, details, request):
            return await continuation(_with_token(details, header), request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation, details, request):
            return await continuation(_with_token(details, header), request)

    class StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation, details, request_iterator):
            return await continuation(_with_token(details, header), request_iterator)

    return [UnaryUnary(), UnaryStream(), StreamUnary()]
