"""The ONNX Runtime session behind the embedder: manifest checks, execution providers, inference."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from lookalike.embedder.config import EmbedderConfig
from lookalike.codec import file_sha256, read_manifest
from lookalike.embedder.preprocess import FaceCrop, face_box
from lookalike.serving.cpus import available_cpus
from lookalike.v1 import manifest_pb2

log = logging.getLogger(__name__)

PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


class ModelError(RuntimeError):
    """The model folder cannot be served as it is (missing file, checksum mismatch, wrong graph)."""


def _provider_options(name: str, config: EmbedderConfig) -> tuple[str, dict[str, str]]:
    provider = PROVIDER_NAMES[name]
    if name == "tensorrt":
        options = {"trt_fp16_enable": str(config.tensorrt_fp16)}
        if config.tensorrt_cache_dir is not None:
            options.update(trt_engine_cache_enable="True", trt_engine_cache_path=str(config.tensorrt_cache_dir),
                           trt_timing_cache_enable="True")
        return provider, options
    return provider, {}


class OnnxModel:
    """A verified model folder loaded into an ONNX Runtime session."""

    def __init__(self, config: EmbedderConfig) -> None:
        self.manifest: manifest_pb2.ModelManifest = read_manifest(config.model_dir)
        onnx_path = Path(config.model_dir) / self.manifest.onnx_file
        if not onnx_path.is_file():
            raise ModelError(f"{onnx_path} is missing (named by manifest.json onnx_file)")
        actual = file_sha256(onnx_path)
        if actual != self.manifest.sha256:
            raise ModelError(f"{onnx_path} has sha256 {actual}, manifest says {self.manifest.sha256}: "
                             "the model was changed after export")
        options = ort.SessionOptions()
        # 0: one thread per CPU the pod may use (its cgroup quota), not per core of the node.
        options.intra_op_num_threads = config.threads or available_cpus()
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.spin_wait else "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.requested_providers = [PROVIDER_NAMES[name] for name in config.providers]
        if any(name != "cpu" for name in config.providers) and hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu finds CUDA and cuDNN installed from PyPI (nvidia-* wheels beside it) only once
            # they are loaded; system-wide libraries (the CUDA base image) load either way. CPU builds: a no-op.
            ort.preload_dlls()
        self.session = ort.InferenceSession(str(onnx_path), options,
                                            providers=[_provider_options(name, config) for name in config.providers])
        self.providers: list[str] = self.session.get_providers()
        self._check_graph()
        self.input_name = self.manifest.input.name
        self.input_size = (self.manifest.input.width, self.manifest.input.height)
        try:
            self.face_crop = FaceCrop.from_manifest(self.manifest.input)
            if self.face_crop is not None:
                face_box(Image.new("RGB", (32, 32)), self.face_crop)  # loads the detector now, not per request
        except (ValueError, ImportError, RuntimeError) as error:
            raise ModelError(f"the manifest asks for a face crop this embedder cannot do: {error}") from error
        self._outputs = [self.manifest.output.embedding, self.manifest.output.probabilities]

    def _check_graph(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        expected = self.manifest.input.name
        if expected not in inputs or inputs[expected].type != "tensor(uint8)":
            found = {name: i.type for name, i in inputs.items()}
            raise ModelError(f"graph inputs are {found}, manifest expects uint8 input {expected!r}")
        missing = {self.manifest.output.embedding, self.manifest.output.probabilities} - outputs
        if missing:
            raise ModelError(f"graph has outputs {sorted(outputs)}, manifest expects {sorted(missing)} too")

    @property
    def missing_gpu_providers(self) -> list[str]:
        """Requested GPU providers that ONNX Runtime did not activate (it falls back to CPU silently)."""
        return [p for p in self.requested_providers if p != "CPUExecutionProvider" and p not in self.providers]

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, H, W, 3] -> (embeddings [N, D], probabilities [N, C]), float32."""
        embeddings, probabilities = self.session.run(self._outputs, {self.input_name: images})
        return embeddings, probabilities

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 8)) -> None:
        """Runs a few batches so the first real request does not pay for lazy initialisation."""
        width, height = self.input_size
        expected = (self.manifest.embedding_dim, len(self.manifest.labels))
        for size in batch_sizes:
            embeddings, probabilities = self.run(np.zeros((size, height, width, 3), dtype=np.uint8))
            # A manifest that does not describe the graph would pass every check and fail each Embed later.
            if (embeddings.shape[1], probabilities.shape[1]) != expected:
                raise ModelError(f"the graph answers {embeddings.shape[1]}-d embeddings and {probabilities.shape[1]} "
                                 f"category probabilities, manifest.json says {expected[0]} and {expected[1]} labels")
