"""Reduced-precision twins of an fp32 model folder, each with its drift from the fp32 graph measured on real images.

int8: static quantisation (QDQ, per-channel weights) calibrated on real images. Static, not dynamic: dynamic
int8 measured 7-15x slower than fp32 for CNNs on these CPUs.
fp16: the backbone's convolutions in half precision, for GPUs (tensor cores); fp32 stays the reference.
"""
from __future__ import annotations

import datetime as dt
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.onnx_model import OnnxModel as GraphEditor

from lookalike.quality.labelled_images import LabelledImage
from lookalike.embedder.preprocess import FaceCrop
from lookalike.exporter.export import (ONNX_FILE, decode_files, embed_files, model_identity, servable,
                                       written_in_place)
from lookalike.codec import file_sha256, read_manifest, write_manifest
from lookalike.quality.retrieval_metrics import expected_calibration_error, negative_log_likelihood
from lookalike.quality.routing_fit import routing_at
from lookalike.v1 import manifest_pb2

log = logging.getLogger(__name__)

METHOD = "static-int8-qdq-per-channel"
FP16_METHOD = "fp16-backbone"
# Convolutions carry nearly all the compute; Clip (ReLU6) and Add are included so each activation is
# quantised on its clipped range rather than the convolution's raw one (cosine to fp32 0.82 -> 0.92 on
# grocery val). The head, pooling and normalisation stay fp32, so probabilities and norms stay exact.
QUANTIZED_OPS = ["Conv", "Clip", "Add"]
# The stem, the first block and the 1280-wide head convolution are the most sensitive and cheap:
# keeping them fp32 raised cosine 0.974 -> 0.985 at the same speed.
FP32_CONV_SCOPES = ("/_conv_stem/", "/_blocks.0/", "/_conv_head/")


class _ImageBatches(CalibrationDataReader):
    """Feeds calibration images to ONNX Runtime's calibrator in small batches."""

    def __init__(self, input_name: str, pixels: np.ndarray, batch_size: int = 16) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = (
            {input_name: pixels[start:start + batch_size]} for start in range(0, len(pixels), batch_size))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def top_k_overlap(reference: np.ndarray, candidate: np.ndarray, k: int = 10) -> float:
    """Mean share of each item's k nearest neighbours (itself excluded) that two embeddings agree on."""
    def neighbours(vectors: np.ndarray) -> np.ndarray:
        similarity = vectors @ vectors.T
        np.fill_diagonal(similarity, -np.inf)
        return np.argsort(-similarity, axis=1)[:, :k]

    ours, theirs = neighbours(reference), neighbours(candidate)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ours, theirs)]))


def quantize_model(fp32_dir: Path, int8_dir: Path, calibration: Sequence[LabelledImage],
                   validation: Sequence[LabelledImage]) -> manifest_pb2.ModelManifest:
    """fp32 model folder -> int8 model folder whose manifest records its drift from the fp32 graph.

    Written beside `int8_dir` and moved there when complete, as the fp32 model is (export.written_in_place)."""
    parent = read_manifest(fp32_dir)
    size = parent.input.height
    crop = FaceCrop.from_manifest(parent.input)
    calibration = servable(calibration, crop)
    with written_in_place(Path(int8_dir)) as folder, tempfile.TemporaryDirectory() as scratch:
        int8_path = folder / ONNX_FILE
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(Path(fp32_dir) / parent.onnx_file), str(prepared), skip_symbolic_shape=True)

        kept_fp32 = [node.name for node in onnx.load(str(prepared)).graph.node
                     if node.op_type == "Conv" and any(scope in node.name for scope in FP32_CONV_SCOPES)]
        if len(kept_fp32) != 4:
            log.warning("expected 4 sensitive convolutions to keep in fp32, found %s", kept_fp32)
        pixels = decode_files(calibration, size, face_crop=crop)
        log.info("calibrating int8 on %d images", len(pixels))
        quantize_static(str(prepared), str(Path(scratch) / ONNX_FILE), _ImageBatches(parent.input.name, pixels),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, op_types_to_quantize=QUANTIZED_OPS,
                        nodes_to_exclude=kept_fp32, calibrate_method=CalibrationMethod.MinMax,
                        # 7-bit weights: x86 u8s8 kernels without VNNI saturate 16-bit sums with
                        # full-range weights (cosine 0.92 -> 0.974); u8u8 avoids it but ran 8x slower.
                        reduce_range=True)
        shutil.move(str(Path(scratch) / ONNX_FILE), int8_path)

        measures = measure_twin(Path(fp32_dir), parent, int8_path, validation, METHOD,
                                calibration_images=len(calibration))
        return write_twin_manifest(parent, folder, "int8", measures)


def half_precision_model(fp32_dir: Path, fp16_dir: Path, validation: Sequence[LabelledImage]) -> manifest_pb2.ModelManifest:
    """fp32 model folder -> fp16 model folder whose manifest records its drift from the fp32 graph.

    Everything up to the last convolution runs in fp16; pooling, the heads, the normalisation and the softmax
    stay fp32 (a few kFLOPs), so vectors stay unit length and probabilities sum to one at fp32 precision.
    Inputs (uint8 pixels) and outputs (float32) keep their types, so the embedder serves it like the fp32 graph.
    Written beside `fp16_dir` and moved there when complete, as the fp32 model is (export.written_in_place).
    """
    parent = read_manifest(fp32_dir)
    graph = GraphEditor(onnx.load(str(Path(fp32_dir) / parent.onnx_file)))
    nodes = graph.nodes()
    last_conv = max(index for index, node in enumerate(nodes) if node.op_type == "Conv")
    # ONNX Runtime's converter, then its own clean-up: the fp32 -> fp16 -> fp32 casts the converter leaves
    # between the nodes kept in fp32 go (they would round the embedding's norm to fp16), and the casts it
    # appends at the end are sorted into place.
    graph.convert_float_to_float16(keep_io_types=True, node_block_list=[node.name for node in nodes[last_conv + 1:]])
    graph.topological_sort()
    with written_in_place(Path(fp16_dir)) as folder:
        fp16_path = folder / ONNX_FILE
        onnx.save(graph.model, str(fp16_path))
        measures = measure_twin(Path(fp32_dir), parent, fp16_path, validation, FP16_METHOD, calibration_images=0)
        return write_twin_manifest(parent, folder, "fp16", measures)


@dataclass(frozen=True)
class TwinMeasures:
    """What a twin's manifest says of its own graph: its drift from the parent, and the parent's fitted routing
    and calibration with the figures they give on the twin's probabilities (None where the parent has none)."""

    drift: manifest_pb2.QuantizationDrift
    routing: manifest_pb2.RoutingDefaults | None
    calibration: manifest_pb2.Calibration | None


def measure_twin(fp32_dir: Path, parent: manifest_pb2.ModelManifest, twin_path: Path,
                 validation: Sequence[LabelledImage], method: str, calibration_images: int) -> TwinMeasures:
    """How far a reduced-precision graph's outputs are from its fp32 parent's on the same images, and what the
    parent's routing threshold and temperature give with the twin's probabilities: the values stay the
    parent's (fitted on the fp32 graph), the routing recall, shards, ECE and NLL are measured on the twin."""
    size = parent.input.height
    crop = FaceCrop.from_manifest(parent.input)
    validation = servable(validation, crop)
    fp32_embeddings, fp32_probabilities = embed_files(fp32_dir / parent.onnx_file, validation, size, face_crop=crop)
    twin_embeddings, twin_probabilities = embed_files(twin_path, validation, size, face_crop=crop)
    cosines = np.sum(fp32_embeddings * twin_embeddings, axis=1)
    drift = manifest_pb2.QuantizationDrift(
        method=method,
        parent_model_id=parent.model_id,
        calibration_images=calibration_images,
        validation_images=len(validation),
        mean_cosine=float(np.mean(cosines)),
        top10_overlap=top_k_overlap(fp32_embeddings, twin_embeddings, k=min(10, len(validation) - 1)),
        category_agreement=float(np.mean(fp32_probabilities.argmax(1) == twin_probabilities.argmax(1))),
        min_cosine=float(np.min(cosines)),
    )
    log.info("%s drift: mean cosine %.4f (lowest %.4f), top-10 overlap %.3f, category agreement %.3f", method,
             drift.mean_cosine, drift.min_cosine, drift.top10_overlap, drift.category_agreement)
    labels = list(parent.labels)
    known = [row for row, image in enumerate(validation) if image.category in labels]
    probabilities = twin_probabilities[known]
    truth = np.array([labels.index(validation[row].category) for row in known], dtype=np.int64)
    routing = calibration = None
    if parent.HasField("routing") and known:
        routing = manifest_pb2.RoutingDefaults()
        routing.CopyFrom(parent.routing)
        routing.queries = len(known)
        routing.routing_recall, routing.expected_shards = routing_at(
            [list(zip(labels, map(float, row))) for row in probabilities], [labels[t] for t in truth], labels,
            parent.routing.threshold, parent.routing.max_shards)
    if parent.HasField("calibration") and known:
        calibration = manifest_pb2.Calibration()
        calibration.CopyFrom(parent.calibration)
        calibration.images = len(known)
        calibration.ece_after = expected_calibration_error(probabilities, truth)
        calibration.nll_after = negative_log_likelihood(probabilities, truth)
    return TwinMeasures(drift, routing, calibration)


def write_twin_manifest(parent: manifest_pb2.ModelManifest, twin_dir: Path, precision: str,
                        measures: TwinMeasures) -> manifest_pb2.ModelManifest:
    """The parent's manifest, re-identified for the twin's graph, carrying its drift and the routing and
    calibration figures measured on it; written beside it."""
    manifest = manifest_pb2.ModelManifest()
    manifest.CopyFrom(parent)
    sha256 = file_sha256(twin_dir / ONNX_FILE)
    name = parent.model_id.split("@")[0]
    manifest.model_id = f"{name}-{precision}@{model_identity(sha256, parent.input)[:12]}"
    manifest.sha256 = sha256
    manifest.onnx_file = ONNX_FILE
    manifest.precision = precision
    manifest.ClearField("parity")
    manifest.quantization.CopyFrom(measures.drift)
    # The parent's figures were measured on the fp32 graph; the twin's own replace them (or go, if unmeasured).
    for field, measured in (("routing", measures.routing), ("calibration", measures.calibration)):
        manifest.ClearField(field)
        if measured is not None:
            getattr(manifest, field).CopyFrom(measured)
    manifest.created_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    write_manifest(twin_dir, manifest)
    return manifest
