"""Shared fixtures: the real data sets, a real exported model, a real embedder server on port 0."""
from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from hypothesis import settings

from lookalike.client.facade import upsert_batches
from lookalike.client.searcher_client import CatalogueItem, SearcherClient
from lookalike.client.shard_map import ShardMapClient
from lookalike.tools.benchmarking import DATASETS
from lookalike.tools.postgres import postgres_available, running_postgres

# The property tests draw the same examples on every run unless asked to explore (HYPOTHESIS_PROFILE=explore),
# so a CI run passes or fails on the code, not on the draw.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

ROOT = Path(__file__).resolve().parents[1]
GROCERY = DATASETS / "grocery"
CLOTHING = DATASETS / "clothing-small"

needs_datasets = pytest.mark.skipif(
    not GROCERY.is_dir(), reason=f"real photos not found at {DATASETS} (../shared/datasets is absent in a user's clone)")


@pytest.fixture(scope="session")
def grocery_train() -> list:
    if not GROCERY.is_dir():
        pytest.skip(f"real photos not found at {DATASETS} (../shared/datasets is absent in a user's clone)")
    from lookalike.quality.labelled_images import read_labelled_images

    return read_labelled_images(GROCERY / "train.txt")


@pytest.fixture(scope="session")
def grocery_val() -> list:
    if not GROCERY.is_dir():
        pytest.skip(f"real photos not found at {DATASETS} (../shared/datasets is absent in a user's clone)")
    from lookalike.quality.labelled_images import read_labelled_images

    return read_labelled_images(GROCERY / "val.txt")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, grocery_train: list, grocery_val: list) -> Path:
    """EfficientNet-Lite0 (real ImageNet weights) + a head fitted on 5 grocery photos per category, exported."""
    from lookalike.exporter.__main__ import per_category_sample
    from lookalike.exporter.export import ExportSettings, export_default_model

    out = tmp_path_factory.mktemp("model")
    train = per_category_sample(grocery_train, 5, seed=0)
    validation = random.Random(0).sample(grocery_val, 24)
    export_default_model(train, out, ExportSettings(parity_images=8), validation=validation, trained_on="test subset")
    return out


@pytest.fixture()
def image_bytes(grocery_val: list) -> list[bytes]:
    """A few real grocery JPEGs."""
    return [image.read_bytes() for image in grocery_val[:6]]


@pytest.fixture(scope="module")
def embedder(model_dir: Path) -> Iterator[tuple[object, grpc.Channel]]:
    """A real embedder server on port 0 with small limits, and a channel to it."""
    from lookalike.embedder.config import EmbedderConfig
    from lookalike.embedder.server import create_server

    config = EmbedderConfig(model_dir=model_dir, address="127.0.0.1:0", max_images_per_request=8,
                            max_message_bytes=4 * 1024 * 1024, max_image_bytes=2 * 1024 * 1024,
                            max_image_pixels=12_000_000, max_delay_ms=20)
    started, port = create_server(config)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)])
    yield started, channel
    channel.close()
    started.stop(None)


@pytest.fixture(scope="session")
def grocery_embeddings(model_dir: Path, grocery_train: list, grocery_val: list) -> dict:
    """Real embeddings by the exported model: every grocery train photo (catalogue) and 60 val photos (queries)."""
    from lookalike.exporter.export import embed_files
    from lookalike.codec import read_manifest

    manifest = read_manifest(model_dir)
    queries = random.Random(3).sample(grocery_val, 60)
    catalogue_vectors, _ = embed_files(model_dir / "model.onnx", grocery_train, 224)
    query_vectors, query_probabilities = embed_files(model_dir / "model.onnx", queries, 224)
    return {"model_id": manifest.model_id, "labels": list(manifest.labels), "catalogue": grocery_train,
            "catalogue_vectors": catalogue_vectors, "queries": queries, "query_vectors": query_vectors,
            "query_probabilities": query_probabilities}


def store_in(items: list[CatalogueItem], *clients: SearcherClient | ShardMapClient) -> None:
    """Upserts `items` through each searcher client in the facade's batches, every item acknowledged."""
    for batch, _ in upsert_batches(items, replace=False):
        for client in clients:
            statuses = client.upsert(batch).statuses
            assert all(s.code == 0 for s in statuses), [s.message for s in statuses if s.code][:3]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`lookalike ARGS...` in a child process from the checkout's root, its output captured."""
    return subprocess.run([sys.executable, "-m", "lookalike.tools.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def start_searcher(data_dir: Path, address_override: str = "127.0.0.1:0", **overrides: object) -> tuple[object, grpc.Channel]:
    """A real searcher server on port 0 (or the given address) over `data_dir`, and a channel to it."""
    from lookalike.searcher.config import SearcherConfig
    from lookalike.searcher.server import create_server

    config = SearcherConfig(data_dir=data_dir, address=address_override, **overrides)
    started, port = create_server(config)
    return started, grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)])


class SlowNetwork(grpc.UnaryUnaryClientInterceptor):
    """Holds each answer `seconds` on the client's side before handing it over, as a slow network would: the
    calls reach the real server and each ends well within its own deadline, but an operation of several calls
    takes `seconds` a call. `calls` counts them."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0
        self._lock = threading.Lock()  # a sharded client calls its pods from several threads

    def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        with self._lock:
            self.calls += 1
        answer = continuation(client_call_details, request)  # a sync channel's call has ended when this returns
        time.sleep(self.seconds)
        return answer


class SlowNetworkAsync(grpc.aio.UnaryUnaryClientInterceptor):
    """SlowNetwork for asyncio channels."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0

    async def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        self.calls += 1
        call = await continuation(client_call_details, request)
        try:
            await call  # the call has ended
        except grpc.RpcError:
            return call
        await asyncio.sleep(self.seconds)
        return call


@pytest.fixture(scope="session")
def postgres_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real PostgreSQL server for the whole session (about 2 s to start): the DSN of its `lookalike` database."""
    reason = postgres_available()
    if reason:
        pytest.skip(reason)
    with running_postgres(tmp_path_factory.mktemp("postgres")) as dsn:
        yield dsn


@pytest.fixture()
def fresh_database(postgres_dsn: str) -> Iterator[str]:
    """An empty database of its own for each test on the session's server, dropped afterwards."""
    import psycopg
    from psycopg import sql

    name = f"test_{uuid.uuid4().hex[:16]}"
    server = postgres_dsn.rsplit("/", 1)[0]
    admin = f"{server}/postgres"
    # CREATE/DROP DATABASE cannot run inside a transaction, hence autocommit.
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield f"{server}/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        # FORCE: a connection the test leaked (a pool, a crashed client) must not keep the database alive.
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
