"""Errors the client sees, in the OpenAI shape `{"error": {"message", "type", "param", "code"}}`.

Everything that goes wrong while serving a request ends up as a `RouterError`: validation problems are 4xx
raised by the serving layer, failures of a prefill or decode instance become 5xx through `upstream_error`.
"""
from __future__ import annotations

import grpc

# gRPC status of a failed instance -> (HTTP status, OpenAI error code).
_UPSTREAM_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.UNAVAILABLE: (503, "instance_unavailable"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (503, "insufficient_capacity"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "instance_timeout"),
    grpc.StatusCode.INVALID_ARGUMENT: (400, "rejected_by_instance"),
}


class RouterError(Exception):
    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code

    def to_dict(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid_request(message: str, param: str | None = None) -> RouterError:
    return RouterError(message, status=400, param=param)


def no_healthy_instance(role: str) -> RouterError:
    return RouterError(f"no healthy {role} instance is available", status=503, code="no_healthy_instance")


def upstream_error(role: str, address: str, error: grpc.aio.AioRpcError) -> RouterError:
    """A failed RPC to a prefill or decode instance, as the client should see it."""
    status, code = _UPSTREAM_STATUS.get(error.code(), (502, "instance_error"))
    details = error.details() or error.code().name
    return RouterError(f"{role} instance {address} failed: {error.code().name}: {details}", status=status, code=code)
