"""`lookalike bench photo`: one shopper's photo to ranked results through both services, one client.

A catalogue of real photos is indexed (grocery's training photos beside the checkout, else the benchmarks'
Fashion-MNIST photos), then three loops run over the query photos against the same embedder and searcher
processes, one call at a time:
- Embed alone (one photo per call);
- Search alone (the queries' embeddings, routed adaptively as Lookalike.search routes them);
- photo to results (Lookalike.search: Embed, then Search), with the medians of its two parts.
Each loop also reports the CPU milliseconds per call of the embedder, the searcher and the client process:
one service's CPU left busy after its reply (a spinning thread pool) slows the other's next call, which the
separate loops do not show. `ratio`: the photo loop's p50 against the sum of the two calls' p50 alone.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lookalike.client.facade import Lookalike, routing_request
from lookalike.codec import read_manifest
from lookalike.quality.labelled_images import LabelledImage, read_labelled_images
from lookalike.tools.bench_embedder import benchmark_model, ensure_int8
from lookalike.tools.benchmarking import default_photos, measure, own_cpu_seconds, p50_p99_ms, process_cpu_seconds
from lookalike.tools.processes import running_service

K = 10


@dataclass
class PhotoRow:
    model: str
    path: str
    calls: int
    p50_ms: float
    p99_ms: float
    embedder_cpu_ms: float
    searcher_cpu_ms: float
    client_cpu_ms: float
    # The photo loop only: its parts' medians, and its p50 against the two calls' p50 measured alone.
    embed_p50_ms: float | None = None
    search_p50_ms: float | None = None
    ratio: float | None = None


def photo_sets(workdir: Path, catalogue_size: int, queries: Path | None = None) -> tuple[list[LabelledImage], list[bytes]]:
    """(catalogue, query photos): grocery's train and val lists when beside the checkout, else Fashion-MNIST
    (the benchmarks' model's training photos, and test photos); `queries` (a folder or list file) replaces the
    query photos, the catalogue stays."""
    default_queries = default_photos(workdir)
    if default_queries.name == "val.txt":
        catalogue = read_labelled_images(default_queries.with_name("train.txt"))
    else:
        catalogue = read_labelled_images(benchmark_model(workdir)[1])
    photos = [image.read_bytes() for image in read_labelled_images(queries or default_queries)]
    return catalogue[:catalogue_size], photos


def bench_model(model_dir: Path, name: str, catalogue: list[LabelledImage], queries: list[bytes],
                seconds: float) -> list[PhotoRow]:
    with tempfile.TemporaryDirectory(prefix="lookalike-bench-photo-") as data, \
            running_service("lookalike.embedder", ["--model", str(model_dir)]) as (embedder, embedder_port), \
            running_service("lookalike.searcher", ["--data", data]) as (searcher, searcher_port), \
            Lookalike(f"127.0.0.1:{embedder_port}", f"127.0.0.1:{searcher_port}") as lookalike:
        for start in range(0, len(catalogue), 64):
            batch = catalogue[start:start + 64]
            lookalike.index([image.path for image in batch], [image.item_id for image in batch])
        embedded = lookalike.embedder.embed(queries)
        routings = [routing_request("adaptive", image, *lookalike.routing) for image in embedded]
        for photo in queries[:10]:
            lookalike.search(photo, k=K)
        cycle = iter(range(1 << 62))
        parts: list[tuple[float, float]] = []

        def embed_alone() -> int:
            lookalike.embedder.embed([queries[next(cycle) % len(queries)]])
            return 1

        def search_alone() -> int:
            i = next(cycle) % len(queries)
            lookalike.searcher.search(embedded[i].vector, lookalike.model_id, K, routings[i])
            return 1

        def photo_to_results() -> int:
            result = lookalike.search(queries[next(cycle) % len(queries)], k=K)
            parts.append((result.embed_seconds, result.search_seconds))
            return 1

        def timed(path: str, call: Callable[[], int]) -> PhotoRow:
            before = (process_cpu_seconds(embedder.pid), process_cpu_seconds(searcher.pid), own_cpu_seconds())
            _, latencies = measure(call, seconds, 1)
            after = (process_cpu_seconds(embedder.pid), process_cpu_seconds(searcher.pid), own_cpu_seconds())
            per_call = [round((b - a) / len(latencies) * 1000, 2) for a, b in zip(before, after)]
            return PhotoRow(name, path, len(latencies), *p50_p99_ms(latencies), *per_call)

        rows = [timed("Embed alone", embed_alone), timed("Search alone", search_alone),
                timed("photo to results (Embed, then Search)", photo_to_results)]
    photo = rows[2]
    photo.embed_p50_ms, photo.search_p50_ms = (round(float(np.median(part)) * 1000, 3) for part in zip(*parts))
    photo.ratio = round(photo.p50_ms / (rows[0].p50_ms + rows[1].p50_ms), 3)
    return rows


def run_photo_bench(workdir: Path, seconds: float = 20.0, catalogue_size: int = 100_000, as_json: bool = False,
                    models: Sequence[Path] | None = None, queries: Path | None = None) -> int:
    """The benchmarks' model and its int8 twin, or the given model folders (each named by its manifest's id);
    the query photos from `queries` when given."""
    if models:
        measured = [(model, read_manifest(model).model_id) for model in models]
    else:
        model_dir, catalog = benchmark_model(workdir)
        measured = [(model_dir, "fp32"), (ensure_int8(model_dir, catalog), "int8")]
    catalogue, photos = photo_sets(workdir, catalogue_size, queries)
    started = time.perf_counter()
    rows = [row for model, name in measured for row in bench_model(model, name, catalogue, photos, seconds)]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    if as_json:
        print(json.dumps({"machine": machine, "catalogue": len(catalogue), "queries": len(photos),
                          "rows": [asdict(row) for row in rows]}, indent=2))
        return 0
    print(f"photo to results on {machine}: {len(catalogue)} catalogue photos, {len(photos)} query photos, 1 client, "
          f"{seconds:.0f} s per row ({time.perf_counter() - started:.0f} s in all)")
    width = max(5, *(len(row.model) for row in rows))
    print(f"{'model':<{width}} {'path':<38} {'calls':>6} {'p50 ms':>7} {'p99 ms':>7} {'CPU ms per call: embedder':>26} "
          f"{'searcher':>8} {'client':>6} {'embed p50':>9} {'search p50':>10} {'ratio':>6}")
    for row in rows:
        print(f"{row.model:<{width}} {row.path:<38} {row.calls:>6} {row.p50_ms:>7} {row.p99_ms:>7} "
              f"{row.embedder_cpu_ms:>26} {row.searcher_cpu_ms:>8} {row.client_cpu_ms:>6} "
              f"{row.embed_p50_ms or '':>9} {row.search_p50_ms or '':>10} {row.ratio or '':>6}")
    return 0
