#!/usr/bin/env bash
# Regenerates the checked-in Python stubs from protos/lookalike/v1/*.proto.
# One pinned generator (grpcio-tools, pinned in pyproject.toml) so every checkout produces the same bytes.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-protos}"
python -m grpc_tools.protoc -I protos \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  protos/lookalike/v1/*.proto
