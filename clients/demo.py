"""`lookalike demo`: a real catalogue end to end on this machine, with nothing prepared beforehand.

Builds the default model (EfficientNet-Lite0 ImageNet + a category head fitted on the catalogue's
labels) once, starts the embedder on a free local port, embeds held-out photos over gRPC through the
client library and reports what it predicted, how accurately and how fast.
"""
from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from pathlib import Path

import numpy as np

from clients.catalog import LabelledImage, read_catalog
from clients.embedder_client import EmbedderClient
from clients.processes import running_service

log = logging.getLogger(__name__)


def _slug(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", str(path.resolve())).strip("-")[-60:]


def stratified(images: list[LabelledImage], count: int, seed: int = 0) -> list[LabelledImage]:
    """About `count` images spread evenly over categories, reproducibly."""
    from exporter.__main__ import per_category_sample

    categories = {image.category for image in images}
    sample = per_category_sample(images, math.ceil(count / max(len(categories), 1)), seed)
    return random.Random(seed).sample(sample, min(count, len(sample)))


def ensure_model(workdir: Path, catalog: Path, per_category: int) -> Path:
    """The model folder for this catalogue, exported on the first run and reused after."""
    from exporter.__main__ import per_category_sample
    from exporter.export import ExportSettings, export_default_model

    model_dir = workdir / "models" / f"{_slug(catalog)}-{per_category}"
    if (model_dir / "manifest.json").is_file():
        return model_dir
    print(f"building the model: EfficientNet-Lite0 (ImageNet) + category head on {catalog} ...", flush=True)
    train = per_category_sample(read_catalog(catalog), per_category, seed=0)
    export_default_model(train, model_dir, ExportSettings(), trained_on=f"{catalog} ({len(train)} images)")
    return model_dir


def run_demo(workdir: Path, catalog: Path | None = None, queries: Path | None = None, per_category: int = 200,
             query_count: int = 200, as_json: bool = False) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    if catalog is None or queries is None:
        from clients.fashion_mnist import materialize

        catalog = catalog or materialize(workdir / "fashion-mnist", "train", per_category)
        queries = queries or materialize(workdir / "fashion-mnist", "test", math.ceil(query_count / 10))
    started = time.perf_counter()
    model_dir = ensure_model(workdir, catalog, per_category)
    query_images = stratified(read_catalog(queries), query_count)

    with running_service("embedder", ["--model", str(model_dir)]) as (_, port):
        with EmbedderClient(f"127.0.0.1:{port}") as client:
            info = client.model_info()
            latencies, results = [], []
            for start in range(0, len(query_images), 16):
                chunk = query_images[start:start + 16]
                sent = time.perf_counter()
                results.extend(client.embed([image.path for image in chunk], ids=[image.item_id for image in chunk],
                                            top_categories=3))
                latencies.append(time.perf_counter() - sent)

    correct = [r.ok and r.top_category == q.category for q, r in zip(query_images, results)]
    summary = {
        "model_id": info.model_id,
        "providers": list(info.providers),
        "catalog": str(catalog),
        "queries": len(query_images),
        "category_top1_accuracy": round(float(np.mean(correct)), 4),
        "images_per_second": round(len(query_images) / sum(latencies), 1),
        "request_p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 1),
        "request_p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 1),
        "images_per_request": 16,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    if as_json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"\nmodel {info.model_id} on {', '.join(info.providers)}; {len(info.labels)} categories\n")
    print(f"{'query':<34} {'true':<12} {'predicted (probability)':<52} ok")
    for query, result in list(zip(query_images, results))[:12]:
        predicted = ", ".join(f"{c} {p:.2f}" for c, p in result.categories) if result.ok else result.error
        print(f"{query.item_id[-34:]:<34} {query.category:<12} {predicted:<52} {'yes' if result.top_category == query.category else 'no'}")
    print(f"\n{summary['queries']} held-out photos: category top-1 accuracy {summary['category_top1_accuracy']:.3f}")
    print(f"throughput {summary['images_per_second']} images/s through gRPC, {summary['images_per_request']} images per "
          f"request: p50 {summary['request_p50_ms']} ms, p99 {summary['request_p99_ms']} ms per request")
    print(f"demo finished in {summary['total_seconds']} s")
    return 0
