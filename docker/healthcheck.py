#!/usr/bin/env python3
"""Container health probe (a stand-in for grpc_health_probe, which the image does not ship): exit 0 when the
target serves.

    hack-healthcheck grpc localhost:50051 [SERVICE]   # grpc.health.v1 Check; SERVICE "" = the whole server
    hack-healthcheck http http://localhost:8000/ready  # any 2xx answer

The gRPC probe speaks TLS when the instance does (HACK_TLS_CERT set), trusting HACK_TLS_CA or else the instance's
own certificate (which must then name localhost); it needs no token: the health service stays open.
"""
from __future__ import annotations

import os
import sys
import urllib.request

TIMEOUT_S = 3.0


def grpc_serving(address: str, service: str = "") -> bool:
    import grpc  # imported here so that the http probe starts fast
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if os.environ.get("HACK_TLS_CERT"):
        with open(os.environ.get("HACK_TLS_CA") or os.environ["HACK_TLS_CERT"], "rb") as file:
            channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=file.read()))
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=TIMEOUT_S)
        except grpc.RpcError as error:  # one line for `docker inspect`, not the multi-line repr
            raise ConnectionError(f"{address}: {error.code().name}: {error.details()}") from None
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        return 200 <= response.status < 300


def main(argv: list[str]) -> int:
    probes = {"grpc": grpc_serving, "http": http_ok}
    if len(argv) < 2 or argv[0] not in probes:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        healthy = probes[argv[0]](*argv[1:])
    except Exception as error:  # no answer means unhealthy; say why (shown by `docker inspect`)
        print(f"unhealthy: {error}", file=sys.stderr)
        return 1
    print("healthy" if healthy else "not serving")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
