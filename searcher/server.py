"""Assembles the searcher's gRPC server: catalogue, servicer, health (per shard too) and reflection."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2
from prometheus_client import REGISTRY

from lookalike.metrics import serve_metrics
from lookalike.service import bind, build_server, start_health_server
from lookalike.v1 import searcher_pb2, searcher_pb2_grpc
from searcher.catalogue import Catalogue
from searcher.config import SearcherConfig
from searcher.metrics import CatalogueCollector
from searcher.servicer import SearcherServicer

log = logging.getLogger(__name__)

SERVICE_NAME = searcher_pb2.DESCRIPTOR.services_by_name["Searcher"].full_name


@dataclass
class SearcherServer:
    """A started server and what must be closed with it."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    catalogue: Catalogue
    collector: CatalogueCollector | None = None
    health_server: grpc.Server | None = None

    def stop(self, grace: float | None = None) -> None:
        """Drains requests, then snapshots every changed shard and closes the database."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self.health_server is not None:
            self.health_server.stop(None)
        if self.collector is not None:
            REGISTRY.unregister(self.collector)
        self.catalogue.close()


def create_server(config: SearcherConfig) -> tuple[SearcherServer, int]:
    """Starts serving health at once, loads the shards (NOT_SERVING meanwhile), then reports SERVING.

    Health names: "" and lookalike.v1.Searcher for the whole server, and lookalike.v1.Searcher/<category>
    for each shard loaded at start-up.
    """
    server, health_servicer = build_server(max_workers=config.grpc_workers, max_message_bytes=config.max_message_bytes,
                                           service_names=[SERVICE_NAME])
    servicer = SearcherServicer(config)
    searcher_pb2_grpc.add_SearcherServicer_to_server(servicer, server)
    port = bind(server, config.address, config.tls_cert, config.tls_key)
    server.start()
    try:
        catalogue = Catalogue(config)
    except Exception:
        server.stop(None)
        raise
    servicer.attach(catalogue)
    catalogue.start_snapshots()
    for category in catalogue.shards:
        health_servicer.set(f"{SERVICE_NAME}/{category}", health_pb2.HealthCheckResponse.SERVING)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    collector = None
    if config.metrics_port:
        collector = CatalogueCollector(catalogue)
        REGISTRY.register(collector)
        serve_metrics(config.metrics_port)
    log.info("searcher serving %d shards on port %d", len(catalogue.shards), port)
    health_server = start_health_server(health_servicer, config.health_address)[0] if config.health_address else None
    return SearcherServer(server, port, health_servicer, catalogue, collector, health_server), port
