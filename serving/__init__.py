"""What both servers share: domain errors, gRPC server assembly, settings from flags and env, RPC metrics."""
