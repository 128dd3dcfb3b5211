"""`lookalike bench`: embedder throughput and latency through gRPC against in-process ONNX Runtime.

Every figure is measured in the same run on the same model and the same real photos:
- baselines: a plain in-process ONNX Runtime loop over pre-decoded batches of 32 (the model's ceiling), and
  in-process loops that decode and run one image at a time, and eight at a time (the work a gRPC call of
  one or eight photos asks for, done in the caller's process);
- the embedder as a separate process, called over gRPC by 1 and by 8 concurrent clients, with its
  micro-batching on and, for comparison, off.
`ratio` is against the in-process batch-32 loop; `same-work ratio` against the in-process decode + run loop
with as many images per call.
"""
from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lookalike.codec import read_manifest

from lookalike.tools.benchmarking import default_photos, measure, p50_p99_ms
from lookalike.quality.labelled_images import read_labelled_images
from lookalike.tools.demo import prepare_demo
from lookalike.client.embedder_client import EmbedderClient
from lookalike.tools.processes import running_service


@dataclass
class Measurement:
    model: str
    scenario: str
    clients: int
    images_per_call: int
    images_per_second: float
    p50_ms: float
    p99_ms: float
    ratio_to_in_process: float = 0.0
    ratio_to_same_work_in_process: float = 0.0


def _row(model: str, scenario: str, clients: int, per_call: int, result: tuple[float, list[float]]) -> Measurement:
    rate, latencies = result
    return Measurement(model, scenario, clients, per_call, round(rate, 1), *p50_p99_ms(latencies))


def embedding_calls(client: EmbedderClient, photos: list[bytes], per_call: int) -> Callable[[], int]:
    """A call for `measure`: each sends the next `per_call` photos (cycling through them) and returns how many
    were embedded. One call is made here first, so connecting is not measured."""
    client.embed(photos[:per_call])
    counter = iter(range(1 << 62))

    def remote() -> int:
        start = next(counter) * per_call % (len(photos) - per_call)
        return len(client.embed(photos[start:start + per_call], top_categories=5))

    return remote


def bench_model(model_dir: Path, name: str, photos: list[bytes], seconds: float) -> list[Measurement]:
    from lookalike.embedder.config import EmbedderConfig
    from lookalike.embedder.model import OnnxModel
    from lookalike.embedder.preprocess import decode_image

    # The in-process loops at their best: a lone loop loses nothing to ONNX Runtime's spin-wait, which the
    # server turns off because it takes a core from decoding between requests.
    model = OnnxModel(EmbedderConfig(model_dir=model_dir, spin_wait=True))
    size = model.input_size
    batch = np.stack([decode_image(photo, size) for photo in photos[:32]])
    model.warm_up((1, 32))
    rows = [_row(name, "in-process ONNX Runtime, pre-decoded batches", 1, 32,
                 measure(lambda: len(model.run(batch)[0]), seconds, 1))]
    cycle = iter(range(1 << 62))

    def decode_and_run(count: int) -> int:
        start = next(cycle) * count % (len(photos) - count)
        model.run(np.stack([decode_image(photo, size) for photo in photos[start:start + count]]))
        return count

    rows.append(_row(name, "in-process decode + ONNX Runtime, one image at a time", 1, 1,
                     measure(lambda: decode_and_run(1), seconds, 1)))
    rows.append(_row(name, "in-process decode + ONNX Runtime, 8 images at a time", 1, 8,
                     measure(lambda: decode_and_run(8), seconds, 1)))
    servers = [("gRPC embedder, micro-batching", {}, [(1, 1), (8, 1), (8, 8)]),
               ("gRPC embedder, batching off (max_batch 1)", {"LOOKALIKE_EMBEDDER_MAX_BATCH": "1"}, [(8, 1)])]
    for scenario, env, loads in servers:
        with running_service("lookalike.embedder", ["--model", str(model_dir)], env=env) as (_, port):
            for clients, per_call in loads:
                with EmbedderClient(f"127.0.0.1:{port}") as client:
                    rows.append(_row(name, scenario, clients, per_call,
                                     measure(embedding_calls(client, photos, per_call), seconds, clients)))
    ceiling = rows[0].images_per_second
    same_work = {row.images_per_call: row.images_per_second for row in rows[1:3]}
    for row in rows:
        row.ratio_to_in_process = round(row.images_per_second / ceiling, 3)
        if row.images_per_call in same_work:
            row.ratio_to_same_work_in_process = round(row.images_per_second / same_work[row.images_per_call], 3)
    return rows


def ensure_int8(model_dir: Path, catalog: Path) -> Path:
    from lookalike.tools.demo import stratified
    from lookalike.exporter.quantize import quantize_model

    int8_dir = model_dir.with_name(model_dir.name + "-int8")
    if not (int8_dir / "manifest.json").is_file():
        images = read_labelled_images(catalog)
        quantize_model(model_dir, int8_dir, stratified(images, 128, seed=1), stratified(images, 200, seed=2))
    return int8_dir


def benchmark_model(workdir: Path) -> tuple[Path, Path]:
    """The benchmarks' fp32 model and its catalogue: the demo's (Fashion-MNIST; built once, as `make demo`
    builds it, whichever runs first)."""
    setup = prepare_demo(workdir)
    return setup.model_dir, setup.catalog


def run_embedder_bench(workdir: Path, seconds: float = 8.0, images_dir: Path | None = None,
                       as_json: bool = False, models: Sequence[Path] | None = None) -> int:
    """The benchmarks' model and its int8 twin, or the given model folders (each named by its manifest's id)."""
    if models:
        measured = [(model, read_manifest(model).model_id) for model in models]
    else:
        model_dir, catalog = benchmark_model(workdir)
        measured = [(model_dir, "fp32"), (ensure_int8(model_dir, catalog), "int8")]
    source = images_dir or default_photos(workdir)
    photos = [image.read_bytes() for image in read_labelled_images(source)[:256]]
    rows = [row for model, name in measured for row in bench_model(model, name, photos, seconds)]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"
    if as_json:
        print(json.dumps({"machine": machine, "images": str(source), "rows": [asdict(r) for r in rows]}, indent=2))
        return 0
    print(f"embedder benchmark on {machine}; {len(photos)} real photos from {source}; {seconds:.0f} s per row")
    width = max(9, *(len(r.model) for r in rows))
    print(f"{'model':<{width}} {'scenario':<54} {'clients':>7} {'img/call':>8} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'ratio':>6} {'same-work ratio':>15}")
    for r in rows:
        print(f"{r.model:<{width}} {r.scenario:<54} {r.clients:>7} {r.images_per_call:>8} {r.images_per_second:>8} "
              f"{r.p50_ms:>8} {r.p99_ms:>8} {r.ratio_to_in_process:>6} {r.ratio_to_same_work_in_process or '':>15}")
    return 0
