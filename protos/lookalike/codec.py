"""Wire codecs shared by every component: packed float32 vectors, manifest JSON and the model file's checksum."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from google.protobuf import json_format

from lookalike.v1 import common_pb2, manifest_pb2

MANIFEST_FILE = "manifest.json"
_FLOAT32_LE = np.dtype("<f4")


class VectorError(ValueError):
    """A Vector message whose bytes do not hold what its header says."""


def pack_vector(values: np.ndarray) -> common_pb2.Vector:
    """One 1-d array as a Vector message (little-endian float32 bytes + dimension)."""
    array = np.ascontiguousarray(values, dtype=_FLOAT32_LE)
    if array.ndim != 1:
        raise VectorError(f"vector must be 1-dimensional, got shape {array.shape}")
    return common_pb2.Vector(values=array.tobytes(), dimension=array.shape[0])


def unpack_vector(vector: common_pb2.Vector, field: str = "vector") -> np.ndarray:
    """The float32 array in a Vector message, checked against its declared dimension.

    `field` names the message in error texts, e.g. "items[3].vector".
    """
    if len(vector.values) % 4:
        raise VectorError(f"{field}.values has {len(vector.values)} bytes, expected a multiple of 4 (float32)")
    count = len(vector.values) // 4
    if count != vector.dimension:
        raise VectorError(
            f"{field}.values holds {count} float32 values but {field}.dimension says {vector.dimension}"
        )
    if count == 0:
        raise VectorError(f"{field} is empty, expected at least one value")
    return np.frombuffer(vector.values, dtype=_FLOAT32_LE)


def read_manifest(model_dir: Path) -> manifest_pb2.ModelManifest:
    """The manifest in a model folder."""
    path = Path(model_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"model folder {model_dir} has no {MANIFEST_FILE}: expected a folder written by "
                                f"`lookalike export` (model.onnx and {MANIFEST_FILE})")
    try:
        return json_format.Parse(path.read_text(encoding="utf-8"), manifest_pb2.ModelManifest())
    except json_format.ParseError as error:
        raise ValueError(f"{path} is not a model manifest: {error}") from error


def write_manifest(model_dir: Path, manifest: manifest_pb2.ModelManifest) -> Path:
    """Writes the manifest beside its model, atomically, and returns its path."""
    path = Path(model_dir) / MANIFEST_FILE
    text = json_format.MessageToJson(manifest, preserving_proto_field_name=True, indent=2, sort_keys=True)
    staging = path.with_suffix(".json.tmp")
    staging.write_text(text + "\n", encoding="utf-8")
    staging.replace(path)
    return path


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in blocks so a model of gigabytes never sits in memory whole: what
    the exporter writes into a manifest and what the embedder checks against it."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
