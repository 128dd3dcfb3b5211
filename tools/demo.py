"""`lookalike demo`: visual search end to end on a real catalogue, with nothing prepared beforehand.

Builds the default model (EfficientNet-Lite0 ImageNet + a category head fitted on the catalogue's
labels) once, starts the embedder and the searcher on free local ports, indexes the catalogue (resuming
where a previous run stopped), searches with held-out photos routed on the predicted categories, and
reports what it found, mAP@10 and latency; it also draws a contact sheet (each query beside its hits).
"""
from __future__ import annotations

import json
import logging
import math
import random
import re
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from lookalike.quality.labelled_images import LabelledImage, read_labelled_images, refuse_shared_photos
from lookalike.client.indexing import IndexSummary, index_catalogue
from lookalike.client.facade import Lookalike, SearchResult
from lookalike.quality.retrieval_metrics import average_precision, average_precision_over_hits, hit_at, precision_at
from lookalike.tools.processes import running_service
from lookalike.codec import read_manifest

log = logging.getLogger(__name__)

HEAD_PER_CATEGORY = 200
SHEET_QUERIES, SHEET_HITS, THUMB = 12, 6, 96


def _slug(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", str(path.resolve())).strip("-")[-60:]


def stratified(images: list[LabelledImage], count: int, seed: int = 0) -> list[LabelledImage]:
    """About `count` images spread evenly over categories, reproducibly."""
    from lookalike.exporter.__main__ import per_category_sample

    categories = {image.category for image in images}
    sample = per_category_sample(images, math.ceil(count / max(len(categories), 1)), seed)
    return random.Random(seed).sample(sample, min(count, len(sample)))


def ensure_model(workdir: Path, catalog: Path, per_category: int) -> Path:
    """The model folder for this catalogue, exported on the first run and reused after."""
    from lookalike.exporter.__main__ import per_category_sample
    from lookalike.exporter.export import ExportSettings, export_default_model

    model_dir = workdir / "models" / f"{_slug(catalog)}-{per_category}"
    # Reused only as built here: with held-out images, so calibrated and with fitted routing (a folder of no
    # more than per_category images a class, as an older benchmark wrote, left none to hold out).
    if (model_dir / "manifest.json").is_file() and read_manifest(model_dir).HasField("routing"):
        return model_dir
    everything = read_labelled_images(catalog)
    train = per_category_sample(everything, per_category, seed=0)
    # Other catalogue images (never the queries) calibrate the head's probabilities, which routing relies on.
    chosen = {image.item_id for image in train}
    held_out = per_category_sample([i for i in everything if i.item_id not in chosen], max(per_category // 4, 5), 1)
    if not held_out:
        raise ValueError(f"{catalog} has no images beyond the {per_category} a category the model trains on: none "
                         "left to calibrate it and fit its routing")
    print(f"building the model: EfficientNet-Lite0 (ImageNet) + category head on {catalog} ...", file=sys.stderr,
          flush=True)
    export_default_model(train, model_dir, ExportSettings(), validation=held_out,
                         trained_on=f"{catalog} ({len(train)} images; {len(held_out)} held out for calibration)")
    return model_dir


def contact_sheet(rows: list[tuple[LabelledImage, SearchResult]], path: Path) -> Path:
    """Each query (left, blue frame) beside its top hits (green frame: same label, red: not)."""
    from PIL import Image, ImageDraw, ImageOps

    from lookalike.pixels import upright

    cell = THUMB + 8
    sheet = Image.new("RGB", ((SHEET_HITS + 1) * cell + 8, len(rows) * cell), "white")
    draw = ImageDraw.Draw(sheet)

    def paste(file: str, column: int, row: int, colour: str) -> None:
        with Image.open(file) as image:
            thumb = ImageOps.pad(upright(image).convert("RGB"), (THUMB, THUMB), color="white")
        x = column * cell + (8 if column else 0)
        draw.rectangle([x, row * cell, x + cell - 3, row * cell + cell - 3], fill=colour)
        sheet.paste(thumb, (x + 3, row * cell + 3))

    for row, (query, result) in enumerate(rows):
        paste(str(query.path), 0, row, "#1f5fbf")
        for column, match in enumerate(result.matches[:SHEET_HITS], start=1):
            paste(match.attributes["path"], column, row, "#2e9e44" if match.attributes.get("label") == query.label
                  else "#d23c3c")
    sheet.save(path)
    return path


@dataclass(frozen=True)
class DemoSetup:
    """What the demo serves: its model, the catalogue sample to index and the held-out query photos."""

    workdir: Path
    catalog: Path
    model_dir: Path
    model_id: str
    catalogue: list[LabelledImage]
    queries: list[LabelledImage]

    @property
    def name(self) -> str:
        # The index belongs to one model (shards are locked to its id): a rebuilt model gets a fresh index.
        return f"{_slug(self.catalog)}-{len(self.catalogue)}-{self.model_id.split('@')[-1]}"


def prepare_demo(workdir: Path, catalog: Path | None = None, queries: Path | None = None, catalog_size: int = 10_000,
                 query_count: int = 200, head_per_category: int = HEAD_PER_CATEGORY) -> DemoSetup:
    """The demo's catalogue and queries (Fashion-MNIST from Debian by default) and its model, built if missing."""
    workdir.mkdir(parents=True, exist_ok=True)
    if catalog is None or queries is None:
        from lookalike.quality.fashion_mnist import materialize

        catalog = catalog or materialize(workdir / "fashion-mnist", "train", math.ceil(catalog_size / 10))
        queries = queries or materialize(workdir / "fashion-mnist", "test", math.ceil(query_count / 10))
    catalogue = stratified(read_labelled_images(catalog), catalog_size)
    query_images = stratified(read_labelled_images(queries), query_count, seed=1)
    refuse_shared_photos(catalogue, query_images, "queries also in the catalogue (each would find itself)")
    model_dir = ensure_model(workdir, catalog, head_per_category)
    return DemoSetup(workdir, catalog, model_dir, read_manifest(model_dir).model_id, catalogue, query_images)


@contextmanager
def demo_services(setup: DemoSetup) -> Iterator[tuple[str, str, IndexSummary]]:
    """Starts the embedder and the searcher on free local ports and indexes the catalogue into them
    (resuming from the journal, so a second run only checks it); yields both addresses and the summary.
    `lookalike demo` and `lookalike web` share it, so both serve the same model and index."""
    name = setup.name
    index_dir = setup.workdir / "searcher" / name
    with running_service("lookalike.embedder", ["--model", str(setup.model_dir)]) as (_, embedder_port), \
            running_service("lookalike.searcher", ["--data", str(index_dir)]) as (_, searcher_port):
        embedder, searcher = f"127.0.0.1:{embedder_port}", f"127.0.0.1:{searcher_port}"
        with Lookalike(embedder, searcher) as lookalike:
            # Progress to stderr: stdout carries the report (`--json`: JSON alone).
            print(f"indexing {len(setup.catalogue)} catalogue images from {setup.catalog} ...", file=sys.stderr,
                  flush=True)
            summary = index_catalogue(lookalike, setup.catalogue, journal=setup.workdir / f"index-journal-{name}.txt",
                                      progress=sys.stderr)
            print(summary.describe(), file=sys.stderr, flush=True)
        yield embedder, searcher, summary


def run_demo(workdir: Path, catalog: Path | None = None, queries: Path | None = None, catalog_size: int = 10_000,
             query_count: int = 200, head_per_category: int = HEAD_PER_CATEGORY, k: int = 10,
             as_json: bool = False) -> int:
    started = time.perf_counter()
    setup = prepare_demo(workdir, catalog, queries, catalog_size, query_count, head_per_category)
    catalog, catalogue, query_images, model_id = setup.catalog, setup.catalogue, setup.queries, setup.model_id
    relevant_total = Counter(image.label for image in catalogue)

    with demo_services(setup) as (embedder, searcher, summary), Lookalike(embedder, searcher) as lookalike:
        results = []
        for query in query_images:
            results.append((query, lookalike.search(query.path, k=k, routing="adaptive")))

    relevance = [[m.attributes.get("label") == q.label for m in r.matches] for q, r in results]
    latency = [r.embed_seconds + r.search_seconds for _, r in results]
    report = {
        "model_id": model_id,
        "catalog": str(catalog), "catalogue_items": len(catalogue), "queries": len(results),
        "indexed_now": summary.indexed, "already_indexed": summary.skipped, "failed": len(summary.failed),
        f"mAP@{k}": round(float(np.mean([average_precision(rel, k, relevant_total[q.label])
                                          for rel, (q, _) in zip(relevance, results)])), 4),
        f"mAP@{k} (over hits retrieved)": round(float(np.mean([average_precision_over_hits(rel, k) for rel in relevance])), 4),
        f"P@{k}": round(float(np.mean([precision_at(rel, k) for rel in relevance])), 4),
        "R@1": round(float(np.mean([hit_at(rel, 1) for rel in relevance])), 4),
        "category_top1_accuracy": round(float(np.mean([r.categories[0][0] == q.category for q, r in results])), 4),
        "routing_recall": round(float(np.mean([q.category in {p.category for p in r.probes} for q, r in results])), 4),
        "mean_shards_probed": round(float(np.mean([len(r.probes) for _, r in results])), 2),
        "query_p50_ms": round(float(np.percentile(latency, 50)) * 1000, 1),
        "query_p99_ms": round(float(np.percentile(latency, 99)) * 1000, 1),
        "search_p50_ms": round(float(np.percentile([r.search_seconds for _, r in results], 50)) * 1000, 2),
    }
    sheet = contact_sheet(results[:SHEET_QUERIES], workdir / "contact-sheet.png")
    report["contact_sheet"] = str(sheet)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    # Like `lookalike index`: a catalogue image that could not be stored fails the run, after the report.
    outcome = 1 if summary.failed else 0
    if as_json:
        print(json.dumps(report, indent=2))
        return outcome
    for query, result in results[:6]:
        predicted = ", ".join(f"{c} {p:.2f}" for c, p in result.categories[:3])
        probed = ", ".join(p.category for p in result.probes)
        print(f"\nquery {query.item_id} (true: {query.label}) predicted: {predicted}; probed: {probed}")
        for rank, match in enumerate(result.matches[:5], start=1):
            verdict = "match" if match.attributes.get("label") == query.label else "-"
            print(f"  {rank}. {match.id:<34} {match.score:.3f}  {match.category:<12} {verdict}")
    print()
    for key, value in report.items():
        print(f"{key}: {value}")
    return outcome
