"""Assembles the searcher's gRPC server: catalogue, servicer, health (per shard too) and reflection."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from grpc_health.v1 import health_pb2
from prometheus_client import REGISTRY

from lookalike.serving.rpc_metrics import serve_metrics
from lookalike.serving.server import RunningServer, bind, build_server, start_health_server
from lookalike.serving.tls import TlsFiles
from lookalike.v1 import searcher_pb2, searcher_pb2_grpc
from lookalike.searcher.catalogue import Catalogue
from lookalike.searcher.config import SearcherConfig
from lookalike.searcher.shard_metrics import CatalogueCollector
from lookalike.searcher.servicer import SearcherServicer

log = logging.getLogger(__name__)

SERVICE_NAME = searcher_pb2.DESCRIPTOR.services_by_name["Searcher"].full_name


@dataclass
class SearcherServer(RunningServer):
    """The started searcher; stopping it snapshots every changed shard and closes the database."""

    catalogue: Catalogue
    collector: CatalogueCollector | None

    def release(self) -> None:
        if self.collector is not None:
            REGISTRY.unregister(self.collector)
        self.catalogue.close()


def create_server(config: SearcherConfig) -> tuple[SearcherServer, int]:
    """Starts serving health at once, loads the shards (NOT_SERVING meanwhile), then reports SERVING.

    Health names: "" and lookalike.v1.Searcher for the whole server, and lookalike.v1.Searcher/<category>
    for each category it serves: SERVING from when its first shard is loaded, created or taken over here,
    NOT_SERVING once the last has moved away.
    """
    server, health_servicer = build_server(max_workers=config.grpc_workers, max_message_bytes=config.max_message_bytes,
                                           service_names=[SERVICE_NAME], auth_tokens=config.auth_tokens,
                                           max_concurrent_rpcs=config.max_concurrent_rpcs,
                                           max_connection_age_seconds=config.max_connection_age_seconds,
                                           otlp_endpoint=config.otlp_endpoint)
    servicer = SearcherServicer(config)
    searcher_pb2_grpc.add_SearcherServicer_to_server(servicer, server)
    port = bind(server, config.address, TlsFiles.from_settings(config.tls_cert, config.tls_key, config.tls_client_ca))
    server.start()
    try:
        catalogue = Catalogue(config)
    except Exception:
        server.stop(None)
        raise

    def shard_health(started: set[str], stopped: set[str]) -> None:
        for category in started:
            health_servicer.set(f"{SERVICE_NAME}/{category}", health_pb2.HealthCheckResponse.SERVING)
        for category in stopped:
            health_servicer.set(f"{SERVICE_NAME}/{category}", health_pb2.HealthCheckResponse.NOT_SERVING)

    catalogue.on_categories = shard_health
    catalogue.announce_categories()
    catalogue.start_background()
    # Answered only now: a replica of a shared store is in the shard map first (start_background's heartbeat),
    # so a shard-map client never meets a searcher that answers but is not listed (until now: UNAVAILABLE).
    servicer.attach(catalogue)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    collector = None
    if config.metrics_port:
        collector = CatalogueCollector(catalogue)
        REGISTRY.register(collector)
        serve_metrics(config.metrics_port)
    log.info("searcher serving %d shards on port %d", len(catalogue.shards), port)
    health_server = start_health_server(health_servicer, config.health_address)[0] if config.health_address else None
    return SearcherServer(server=server, port=port, health=health_servicer, health_server=health_server,
                          catalogue=catalogue, collector=collector), port
