"""host:port strings as gRPC and the router write them."""
from __future__ import annotations

import ipaddress


def join_host_port(host: str, port: int) -> str:
    """host:port, with an IPv6 address in brackets."""
    try:
        is_v6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        is_v6 = False
    return f"[{host}]:{port}" if is_v6 else f"{host}:{port}"
