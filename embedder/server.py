"""Assembles the embedder's gRPC server: model, pipeline, servicer, health and reflection."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from grpc_health.v1 import health_pb2

from lookalike.embedder.config import EmbedderConfig
from lookalike.embedder.model import OnnxModel
from lookalike.embedder.pipeline import EmbeddingPipeline
from lookalike.embedder.servicer import EmbedderServicer
from lookalike.serving.rpc_metrics import serve_metrics
from lookalike.serving.server import RunningServer, bind, build_server, start_health_server
from lookalike.serving.tls import TlsFiles
from lookalike.v1 import embedder_pb2, embedder_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = embedder_pb2.DESCRIPTOR.services_by_name["Embedder"].full_name


@dataclass
class EmbedderServer(RunningServer):
    """The started embedder; stopping it also stops the inference thread and decoders."""

    pipeline: EmbeddingPipeline

    @property
    def serving(self) -> bool:
        return not self.pipeline.model.missing_gpu_providers

    def release(self) -> None:
        self.pipeline.close()


def create_server(config: EmbedderConfig) -> tuple[EmbedderServer, int]:
    """Loads and warms the model, starts serving on config.address, and returns (server, bound port).

    Health turns SERVING only after warm-up, and never when a requested GPU provider is not active
    (onnxruntime-gpu falls back to CPU without failing); the RPCs still answer so operators can see why.
    """
    server, health_servicer = build_server(max_workers=config.grpc_workers,
                                           max_message_bytes=config.max_message_bytes,
                                           service_names=[SERVICE_NAME], auth_tokens=config.auth_tokens,
                                           max_concurrent_rpcs=config.max_concurrent_rpcs,
                                           max_connection_age_seconds=config.max_connection_age_seconds,
                                           otlp_endpoint=config.otlp_endpoint, reuse_port=config.reuse_port)
    servicer = EmbedderServicer(config)
    embedder_pb2_grpc.add_EmbedderServicer_to_server(servicer, server)
    port = bind(server, config.address, TlsFiles.from_settings(config.tls_cert, config.tls_key, config.tls_client_ca))
    server.start()
    try:
        model = OnnxModel(config)
        model.warm_up()
    except Exception:
        server.stop(None)
        raise
    pipeline = EmbeddingPipeline(model, config)
    servicer.attach(pipeline)
    serve_metrics(config.metrics_port)
    health_server = start_health_server(health_servicer, config.health_address)[0] if config.health_address else None
    started = EmbedderServer(server=server, port=port, health=health_servicer, health_server=health_server,
                             pipeline=pipeline)
    if started.serving:
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("embedder serving %s on port %d with %s", model.manifest.model_id, port, model.providers)
    else:
        log.error("requested execution providers %s are not active (active: %s); health stays NOT_SERVING",
                  model.missing_gpu_providers, model.providers)
    return started, port
