"""The gRPC contract (package `hack.v1`) between the router, the prefill and the decode services.

`hack.proto` is the source of truth. `hack_pb2.py`, `hack_pb2.pyi` and `hack_pb2_grpc.py` are generated from it
by `scripts/gen_proto.sh` and committed (see README.md); import them as `from proto import hack_pb2, hack_pb2_grpc`.
The bytes inside a KV block are `common.kv.wire` chunks.
"""
from proto import hack_pb2, hack_pb2_grpc

# Names the health service (grpc.health.v1) reports, besides "" for the whole server.
PREFILL_SERVICE_NAME: str = hack_pb2.DESCRIPTOR.services_by_name["PrefillService"].full_name
DECODE_SERVICE_NAME: str = hack_pb2.DESCRIPTOR.services_by_name["DecodeService"].full_name

# Trailing metadata of a failed Prefill whose cause is the decode instance (hack.proto, header comment).
FAILED_ROLE_METADATA_KEY = "hack-failed-role"

_KV_MODES: dict[str, int] = {
    "fp16": hack_pb2.KV_MODE_FP16,
    "dequant": hack_pb2.KV_MODE_DEQUANT,
    "hack": hack_pb2.KV_MODE_HACK,
}
KV_MODE_NAMES: tuple[str, ...] = tuple(_KV_MODES)


def kv_mode_to_proto(name: str) -> int:
    """"fp16" / "dequant" / "hack" -> the KVMode enum value."""
    try:
        return _KV_MODES[name]
    except KeyError:
        raise ValueError(f"unknown kv mode {name!r}; expected one of {KV_MODE_NAMES}") from None


def kv_mode_from_proto(value: int) -> str:
    """The KVMode enum value -> "fp16" / "dequant" / "hack" (KV_MODE_UNSPECIFIED is an error)."""
    for name, mode in _KV_MODES.items():
        if mode == value:
            return name
    raise ValueError(f"KV mode {value} is not one of {KV_MODE_NAMES}")


__all__ = [
    "DECODE_SERVICE_NAME",
    "FAILED_ROLE_METADATA_KEY",
    "KV_MODE_NAMES",
    "PREFILL_SERVICE_NAME",
    "hack_pb2",
    "hack_pb2_grpc",
    "kv_mode_from_proto",
    "kv_mode_to_proto",
]
