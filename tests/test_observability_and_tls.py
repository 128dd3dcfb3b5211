"""Prometheus metrics on both servers, and gRPC over TLS with a plaintext health port for probes."""
from __future__ import annotations

import re
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lookalike.client.connection import ChannelSettings, UnavailableError
from lookalike.client.searcher_client import CatalogueItem, SearcherClient, routing_for
from tests.conftest import start_searcher
from tests.test_clients import free_port


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def test_embedder_metrics(model_dir: Path, image_bytes: list[bytes]) -> None:
    from lookalike.client.embedder_client import EmbedderClient
    from lookalike.embedder.config import EmbedderConfig
    from lookalike.embedder.server import create_server

    metrics_port = free_port()
    started, port = create_server(EmbedderConfig(model_dir=model_dir, address="127.0.0.1:0", metrics_port=metrics_port))
    try:
        with EmbedderClient(f"127.0.0.1:{port}") as client:
            client.embed(image_bytes[:3])
            client.embed([b"broken"])
        text = scrape(metrics_port)
    finally:
        started.stop(None)
    assert 'lookalike_rpc_requests_total{code="OK",method="Embed"}' in text
    assert 'lookalike_rpc_latency_seconds_bucket{code="OK",le="0.5",method="Embed"}' in text
    assert "lookalike_embedder_batch_images_count" in text and "lookalike_embedder_queue_delay_seconds_sum" in text


def test_searcher_metrics(tmp_path: Path) -> None:
    metrics_port = free_port()
    started, channel = start_searcher(tmp_path, snapshot_interval=0, metrics_port=metrics_port)
    try:
        with SearcherClient(f"127.0.0.1:{started.port}") as client:
            vectors = np.eye(4, dtype=np.float32)
            client.upsert([CatalogueItem(f"i{n}", "hats", v, "m") for n, v in enumerate(vectors)])
            client.delete(["i0"])
            client.search(vectors[1], "m", k=2, routing=routing_for(categories=["hats"]))
            with pytest.raises(Exception):
                client.search(vectors[1], "m", k=0)
        text = scrape(metrics_port)
    finally:
        channel.close()
        started.stop(None)
    assert 'lookalike_searcher_shard_items{category="hats"} 3.0' in text
    assert 'lookalike_searcher_shard_deleted_slots{category="hats"} 1.0' in text
    assert 'lookalike_searcher_shard_probes_total{category="hats"}' in text
    # The counter is process-wide: other tests in this process may have counted refused searches too.
    assert re.search(r'lookalike_rpc_requests_total\{code="INVALID_ARGUMENT",method="Search"\} [1-9]', text)


def self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "tls.crt", directory / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_tls_port_and_plaintext_health_port(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    health_port = free_port()
    started, channel = start_searcher(tmp_path / "data", snapshot_interval=0, address_override="localhost:0",
                                      tls_cert=cert, tls_key=key, health_address=f"127.0.0.1:{health_port}")
    try:
        secure = ChannelSettings(f"localhost:{started.port}", tls=True, root_certificates=cert.read_bytes())
        with SearcherClient(secure) as client:
            assert client.stats().items == 0
        plain = ChannelSettings(f"localhost:{started.port}", timeout=2, retries=1)
        with SearcherClient(plain) as client, pytest.raises(UnavailableError):
            client.stats()
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as health_channel:
            reply = health_pb2_grpc.HealthStub(health_channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()
        started.stop(None)


def test_aged_connections_close_without_failing_a_call(tmp_path: Path) -> None:
    """With a 0.3 s connection age the server sends GOAWAY again and again; calls keep succeeding."""
    started, channel = start_searcher(tmp_path, snapshot_interval=0, max_connection_age_seconds=0.3)
    failures = 0
    with SearcherClient(ChannelSettings(f"127.0.0.1:{started.port}", retries=0)) as client:
        deadline = time.monotonic() + 2.0
        calls = 0
        while time.monotonic() < deadline:
            try:
                client.stats()
            except UnavailableError:
                failures += 1
            calls += 1
            time.sleep(0.01)
    channel.close()
    started.stop(None)
    assert calls > 50 and failures == 0
