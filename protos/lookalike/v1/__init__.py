"""Generated protobuf and gRPC stubs for package lookalike.v1 (see scripts/generate_protos.sh)."""
