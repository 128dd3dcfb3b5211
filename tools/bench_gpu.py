"""`lookalike bench gpu`: the embedder on a GPU (ONNX Runtime's CUDA execution provider), fp32 against fp16.

Prepared to run whole in one call on a GPU machine, where time is short. On one model, its fp16 twin and the
same real photos, one run measures:
- parity: each precision's embeddings and top categories on the requested providers against fp32 on the CPU;
- in-process inference by batch size (1 to 256) on pre-decoded batches, fp32 and fp16: with `run` (pixels
  copied in and results copied out each call) and with IOBinding, inputs and outputs kept on the device
  (what the copies cost), with the GPU's utilisation and memory over each row (nvidia-smi);
- JPEG decoding on the host CPUs, one photo per call from one thread per core (the gRPC path decodes on them);
- the gRPC embedder end to end from JPEG bytes: one photo per call from 1 client (latency), and 8 and 32
  photos per call from many clients (throughput).
With `--providers cpu` the same steps run on the CPU, which is how CI checks this command; every row names the
providers that were active.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from lookalike.client.embedder_client import EmbedderClient
from lookalike.codec import read_manifest
from lookalike.quality.labelled_images import read_labelled_images
from lookalike.tools.bench_embedder import embedding_calls
from lookalike.tools.benchmarking import measure, p50_p99_ms
from lookalike.tools.processes import running_service

if TYPE_CHECKING:
    from lookalike.embedder.model import OnnxModel

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class Parity:
    precision: str
    model: str
    providers: list[str]
    images: int
    mean_cosine: float
    min_cosine: float
    category_agreement: float


@dataclass
class Row:
    step: str
    precision: str
    images_per_call: int
    clients: int
    images_per_second: float
    p50_ms: float
    p99_ms: float
    gpu_utilisation_percent: float | None = None
    gpu_memory_mib: float | None = None


@dataclass
class GpuSampler:
    """Samples the GPU's utilisation and memory with nvidia-smi while a row runs (none without nvidia-smi)."""

    utilisation: list[float] = field(default_factory=list)
    memory: list[float] = field(default_factory=list)
    _process: subprocess.Popen | None = None
    _reader: threading.Thread | None = None

    def __enter__(self) -> "GpuSampler":
        if shutil.which("nvidia-smi"):
            self._process = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 "--loop-ms=100", "--id=0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            try:
                utilisation, memory = (float(value) for value in line.split(","))
            except ValueError:
                continue
            self.utilisation.append(utilisation)
            self.memory.append(memory)

    def __exit__(self, *exc_info: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
            assert self._reader is not None
            self._reader.join(10)

    def fill(self, row: Row) -> Row:
        if self.utilisation:
            row.gpu_utilisation_percent = round(float(np.mean(self.utilisation)), 1)
            row.gpu_memory_mib = round(float(np.max(self.memory)), 1)
        return row


def _row(step: str, precision: str, per_call: int, clients: int, result: tuple[float, list[float]],
         sampler: GpuSampler) -> Row:
    rate, latencies = result
    return sampler.fill(Row(step, precision, per_call, clients, round(rate, 1), *p50_p99_ms(latencies)))


def ensure_fp16(model_dir: Path, photos: Path) -> Path:
    """The fp16 twin beside the fp32 model folder, written (with its drift on up to 200 photos) when missing."""
    from lookalike.exporter.quantize import half_precision_model

    fp16_dir = model_dir.with_name(model_dir.name + "-fp16")
    if not (fp16_dir / "manifest.json").is_file():
        half_precision_model(model_dir, fp16_dir, read_labelled_images(photos)[:200])
    return fp16_dir


def _loaded(model_dir: Path, providers: Sequence[str]) -> "OnnxModel":
    from lookalike.embedder.config import EmbedderConfig
    from lookalike.embedder.model import OnnxModel

    model = OnnxModel(EmbedderConfig(model_dir=model_dir, providers=tuple(providers), spin_wait=True))
    if model.missing_gpu_providers:
        raise RuntimeError(f"{', '.join(model.missing_gpu_providers)} requested but not active for {model_dir} "
                           f"(active: {', '.join(model.providers)}); is onnxruntime-gpu installed, with the CUDA "
                           "and cuDNN it was built for?")
    return model


def parity(model: "OnnxModel", precision: str, pixels: np.ndarray,
           expected: tuple[np.ndarray, np.ndarray]) -> Parity:
    """One loaded model against fp32 on the CPU (`expected`: its outputs on the same decoded photos)."""
    embeddings, probabilities = model.run(pixels)
    expected_embeddings, expected_probabilities = expected
    cosines = np.sum(embeddings * expected_embeddings, axis=1)
    return Parity(precision, model.manifest.model_id, model.providers, len(pixels), round(float(cosines.mean()), 6),
                  round(float(cosines.min()), 6),
                  round(float(np.mean(probabilities.argmax(1) == expected_probabilities.argmax(1))), 4))


def in_process_rows(model: "OnnxModel", precision: str, pixels: np.ndarray, batch_sizes: Sequence[int],
                    seconds: float) -> list[Row]:
    import onnxruntime as ort

    on_gpu = "CUDAExecutionProvider" in model.providers
    device = ("cuda", 0) if on_gpu else ("cpu", 0)
    rows = []
    for size in batch_sizes:
        batch = np.ascontiguousarray(np.resize(pixels, (size, *pixels.shape[1:])))
        model.run(batch)
        with GpuSampler() as sampler:
            result = measure(lambda: len(model.run(batch)[0]), seconds, 1)
        rows.append(_row("in-process, run (copies in and out)", precision, size, 1, result, sampler))

        binding = model.session.io_binding()
        binding.bind_ortvalue_input(model.input_name, ort.OrtValue.ortvalue_from_numpy(batch, *device))
        for name in (model.manifest.output.embedding, model.manifest.output.probabilities):
            binding.bind_output(name, *device)

        def bound() -> int:
            model.session.run_with_iobinding(binding)
            return size

        bound()
        with GpuSampler() as sampler:
            result = measure(bound, seconds, 1)
        rows.append(_row("in-process, IOBinding (on the device)", precision, size, 1, result, sampler))
    return rows


def decode_row(photos: list[bytes], size: tuple[int, int], seconds: float) -> Row:
    from lookalike.embedder.preprocess import decode_image

    counter = iter(range(1 << 62))
    threads = os.cpu_count() or 1

    def decode_one() -> int:
        decode_image(photos[next(counter) % len(photos)], size)
        return 1

    with GpuSampler() as sampler:
        result = measure(decode_one, seconds, threads)
    return _row(f"JPEG decode on the host, {threads} threads", "-", 1, threads, result, sampler)


def grpc_rows(model_dir: Path, precision: str, providers: Sequence[str], photos: list[bytes], clients: int,
              seconds: float) -> list[Row]:
    from lookalike.embedder.model import PROVIDER_NAMES

    env = {"LOOKALIKE_EMBEDDER_PROVIDERS": ",".join(providers), "LOOKALIKE_EMBEDDER_MAX_BATCH": "256"}
    rows = []
    with running_service("lookalike.embedder", ["--model", str(model_dir)], env=env) as (_, port):
        with EmbedderClient(f"127.0.0.1:{port}") as client:
            # The served process falls back to the CPU without failing (its health stays NOT_SERVING): such rows
            # would pass for GPU figures.
            active = list(client.model_info().providers)
        missing = [PROVIDER_NAMES[name] for name in providers if name != "cpu" and PROVIDER_NAMES[name] not in active]
        if missing:
            raise RuntimeError(f"the embedder serving {model_dir} runs on {', '.join(active)}, not {', '.join(missing)}")
        for callers, per_call in ((1, 1), (clients, 8), (clients, 32)):
            with EmbedderClient(f"127.0.0.1:{port}") as client:
                calls = embedding_calls(client, photos, per_call)
                with GpuSampler() as sampler:
                    result = measure(calls, seconds, callers)
                rows.append(_row("gRPC embedder from JPEG bytes", precision, per_call, callers, result, sampler))
    return rows


def _gpu_name() -> str:
    if not shutil.which("nvidia-smi"):
        return "no GPU (nvidia-smi not found)"
    answer = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader",
                             "--id=0"], capture_output=True, text=True, timeout=30)
    return answer.stdout.strip() or answer.stderr.strip()


def run_gpu_bench(model_dir: Path, images: Path, providers: Sequence[str] = ("cuda", "cpu"),
                  batch_sizes: Sequence[int] = BATCH_SIZES, seconds: float = 3.0, clients: int = 0,
                  as_json: bool = False) -> int:
    import onnxruntime as ort

    from lookalike.embedder.preprocess import decode_image

    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes {list(batch_sizes)}: expected one or more positive integers")
    model_dir = Path(model_dir)
    models = [("fp32", model_dir), ("fp16", ensure_fp16(model_dir, images))]
    manifest = read_manifest(model_dir)
    size = (manifest.input.width, manifest.input.height)
    photos = [image.read_bytes() for image in read_labelled_images(images)[:256]]
    if len(photos) < 33:
        raise ValueError(f"{images} holds {len(photos)} photos; the gRPC rows send 32 per call, so at least 33 "
                         "are needed")
    pixels = np.stack([decode_image(photo, size) for photo in photos[:64]])
    expected = _loaded(model_dir, ["cpu"]).run(pixels)
    loaded = [(precision, _loaded(folder, providers)) for precision, folder in models]
    parities = [parity(model, precision, pixels, expected) for precision, model in loaded]
    rows = [row for precision, model in loaded for row in in_process_rows(model, precision, pixels, batch_sizes, seconds)]
    del loaded  # the sessions' device memory, before the gRPC embedders load theirs
    rows.append(decode_row(photos, size, seconds))
    callers = clients or 2 * (os.cpu_count() or 1)
    rows += [row for precision, folder in models for row in grpc_rows(folder, precision, providers, photos, callers,
                                                                      seconds)]
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
               f"{platform.python_version()}; GPU: {_gpu_name()}; onnxruntime {ort.__version__} "
               f"({', '.join(ort.get_available_providers())})")
    report = {"machine": machine, "model": manifest.model_id, "images": str(images), "input_px": size[0],
              "seconds_per_row": seconds, "photos": len(photos), "parity": [asdict(p) for p in parities],
              "rows": [asdict(r) for r in rows]}
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


def print_report(report: dict) -> None:
    """The benchmark's report as a table; also reads back a report saved with --json (scripts/gpu_bench.sh)."""
    print(f"GPU benchmark on {report['machine']}")
    print(f"model {report['model']} at {report['input_px']} px; {report['photos']} real photos from {report['images']}; "
          f"{report['seconds_per_row']:g} s per row")
    for p in report["parity"]:
        print(f"parity {p['precision']} ({p['model']}) on {', '.join(p['providers'])} against fp32 on the CPU, "
              f"{p['images']} photos: mean cosine {p['mean_cosine']}, lowest {p['min_cosine']}, category agreement "
              f"{p['category_agreement']}")
    print(f"{'step':<44} {'precision':>9} {'img/call':>8} {'clients':>7} {'img/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'GPU %':>6} {'GPU MiB':>8}")
    for r in report["rows"]:
        utilisation = "-" if r["gpu_utilisation_percent"] is None else r["gpu_utilisation_percent"]
        memory = "-" if r["gpu_memory_mib"] is None else r["gpu_memory_mib"]
        print(f"{r['step']:<44} {r['precision']:>9} {r['images_per_call']:>8} {r['clients']:>7} "
              f"{r['images_per_second']:>9} {r['p50_ms']:>8} {r['p99_ms']:>8} {utilisation:>6} {memory:>8}")
