"""The committed generated code matches proto/hack.proto, and the KV mode names map both ways."""
from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from proto import KV_MODE_NAMES, hack_pb2, hack_pb2_grpc, kv_mode_from_proto, kv_mode_to_proto

REPO_ROOT = Path(__file__).resolve().parents[2]


def compiled_descriptor(tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    protoc = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools (the dev extra) compiles the .proto")
    out = tmp_path / "hack.desc"
    status = protoc.main(["protoc", f"-I{REPO_ROOT}", f"--descriptor_set_out={out}", "proto/hack.proto"])
    assert status == 0, "protoc failed on proto/hack.proto"
    (compiled,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return compiled


def without_json_names(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """protoc fills json_name in descriptor sets but not in generated code; it is derived, so drop it."""
    file = descriptor_pb2.FileDescriptorProto.FromString(file.SerializeToString())
    messages = list(file.message_type)
    while messages:
        message = messages.pop()
        for field in message.field:
            field.ClearField("json_name")
        messages.extend(message.nested_type)
    return file


def test_committed_code_matches_the_proto(tmp_path):
    committed = descriptor_pb2.FileDescriptorProto.FromString(hack_pb2.DESCRIPTOR.serialized_pb)
    assert without_json_names(compiled_descriptor(tmp_path)) == without_json_names(committed), (
        "proto/hack_pb2*.py are stale: run scripts/gen_proto.sh and commit the result"
    )


def test_grpc_stubs_cover_every_rpc():
    for service in hack_pb2.DESCRIPTOR.services_by_name.values():
        stub_type = getattr(hack_pb2_grpc, f"{service.name}Stub")
        servicer_type = getattr(hack_pb2_grpc, f"{service.name}Servicer")
        stub = stub_type(_FakeChannel())
        for method in service.methods:
            assert hasattr(stub, method.name) and hasattr(servicer_type, method.name), (service.name, method.name)


class _FakeChannel:
    """Records nothing: enough for a stub constructor, which only asks the channel for callables."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def test_package_is_versioned():
    assert hack_pb2.DESCRIPTOR.package == "hack.v1"


def test_kv_modes_round_trip():
    assert KV_MODE_NAMES == ("fp16", "dequant", "hack")
    for name in KV_MODE_NAMES:
        assert kv_mode_from_proto(kv_mode_to_proto(name)) == name
    with pytest.raises(ValueError, match="unknown kv mode 'int4'"):
        kv_mode_to_proto("int4")
    with pytest.raises(ValueError, match="KV mode 0"):
        kv_mode_from_proto(hack_pb2.KV_MODE_UNSPECIFIED)
