"""The embedder's settings: one frozen dataclass, from command-line flags with LOOKALIKE_EMBEDDER_* env fallbacks."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

ENV_PREFIX = "LOOKALIKE_EMBEDDER_"
PROVIDERS = ("tensorrt", "cuda", "cpu")


@dataclass(frozen=True)
class EmbedderConfig:
    """Everything the embedder server needs; defaults suit a 2-core CPU node."""

    model_dir: Path
    address: str = "[::]:50051"
    # Execution providers in priority order, from PROVIDERS.
    providers: tuple[str, ...] = ("cpu",)
    # ONNX Runtime intra-op threads; 0 lets ONNX Runtime use one per core.
    threads: int = 0
    # Micro-batching: when the model frees up it takes everything queued, up to max_batch images; with
    # max_delay_ms > 0 it also waits that long for a batch to fill (0 measured best on 2 CPU cores: a
    # lone client pays no wait, and under load requests pile up while the model runs anyway).
    max_batch: int = 32
    max_delay_ms: float = 0.0
    # Images waiting for inference beyond which new requests get RESOURCE_EXHAUSTED (back-pressure).
    max_queued_images: int = 2048
    # Threads decoding and resizing images, off the inference thread.
    decode_workers: int = 2
    max_images_per_request: int = 64
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_message_bytes: int = 64 * 1024 * 1024
    grpc_workers: int = 16
    grace_seconds: float = 5.0
    # TensorRT engine cache, so a restart does not rebuild engines (minutes on big models).
    tensorrt_cache_dir: Path | None = None
    tensorrt_fp16: bool = True

    def __post_init__(self) -> None:
        unknown = [p for p in self.providers if p not in PROVIDERS]
        if unknown or not self.providers:
            raise ValueError(f"providers {list(self.providers)}: each must be one of {list(PROVIDERS)}")
        for name in ("max_batch", "max_images_per_request", "max_image_bytes", "max_image_pixels",
                     "max_message_bytes", "decode_workers", "grpc_workers", "max_queued_images"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> "EmbedderConfig":
        """Flags override LOOKALIKE_EMBEDDER_<FLAG> environment variables, which override defaults."""
        defaults = cls(model_dir=Path("."))
        env = lambda name, default: os.environ.get(ENV_PREFIX + name.upper(), default)  # noqa: E731
        parser = argparse.ArgumentParser(prog="python -m embedder", description="Serve the Lookalike Embedder over gRPC.")
        parser.add_argument("--model", dest="model_dir", type=Path, default=env("model", None),
                            required=env("model", None) is None, help="model folder (model.onnx + manifest.json)")
        parser.add_argument("--address", default=env("address", defaults.address), help="host:port to listen on")
        parser.add_argument("--providers", default=env("providers", ",".join(defaults.providers)),
                            help="comma-separated execution providers in priority order: tensorrt,cuda,cpu")
        for name, kind, text in [
            ("threads", int, "ONNX Runtime intra-op threads (0: one per core)"),
            ("max_batch", int, "largest inference batch"),
            ("max_delay_ms", float, "longest wait for a batch to fill, in ms"),
            ("max_queued_images", int, "images waiting beyond which requests are refused"),
            ("decode_workers", int, "image decoding threads"),
            ("max_images_per_request", int, "images per Embed request"),
            ("max_image_bytes", int, "bytes per encoded image"),
            ("max_image_pixels", int, "pixels per image (decompression-bomb guard)"),
            ("max_message_bytes", int, "largest gRPC message"),
            ("grpc_workers", int, "gRPC handler threads"),
            ("grace_seconds", float, "drain time on SIGTERM"),
        ]:
            flag = "--" + name.replace("_", "-")
            parser.add_argument(flag, dest=name, type=kind, default=kind(env(name, getattr(defaults, name))), help=text)
        parser.add_argument("--tensorrt-cache-dir", type=Path, default=env("tensorrt_cache_dir", None),
                            help="where TensorRT keeps built engines between restarts")
        parser.add_argument("--tensorrt-fp16", action=argparse.BooleanOptionalAction,
                            default=env("tensorrt_fp16", "1") not in ("0", "false", "no"),
                            help="let TensorRT run layers in fp16")
        args = parser.parse_args(argv)
        values = vars(args)
        values["providers"] = tuple(p.strip().lower() for p in values["providers"].split(",") if p.strip())
        return cls(**values)
