#!/usr/bin/env bash
# Regenerate the committed Python code for proto/hack.proto (run after editing the .proto).
# tests/proto/test_generated.py fails when the committed code no longer matches the .proto.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# -I . makes the generated gRPC module import "from proto import hack_pb2", i.e. the package path.
"$PY" -m grpc_tools.protoc -I . \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  proto/hack.proto
echo "generated proto/hack_pb2.py, proto/hack_pb2.pyi, proto/hack_pb2_grpc.py"
