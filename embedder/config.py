"""The embedder's settings: one frozen dataclass, from command-line flags with LOOKALIKE_EMBEDDER_* env fallbacks."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lookalike.serving.settings import check_serving_settings, parse_config

ENV_PREFIX = "LOOKALIKE_EMBEDDER_"
PROVIDERS = ("tensorrt", "cuda", "cpu")


@dataclass(frozen=True)
class EmbedderConfig:
    """Everything the embedder server needs; defaults suit a 2-core CPU node."""

    model_dir: Path
    address: str = "[::]:50051"
    # Execution providers in priority order, from PROVIDERS.
    providers: tuple[str, ...] = ("cpu",)
    # ONNX Runtime intra-op threads; 0: one per CPU the process may use (its cgroup quota and affinity).
    threads: int = 0
    # Let those threads busy-wait for the next batch instead of sleeping. Off: the spin-wait measured a core's
    # worth of CPU between requests, taken from decoding and from a searcher on the same node, for about
    # 0.5 ms less latency at one client (BENCHMARKS.md).
    spin_wait: bool = False
    # Micro-batching: when the model frees up it takes everything queued, up to max_batch images; with
    # max_delay_ms > 0 it also waits that long for a batch to fill (0 measured best on 2 CPU cores: a
    # lone client pays no wait, and under load requests pile up while the model runs anyway).
    max_batch: int = 32
    max_delay_ms: float = 0.0
    # Images waiting for inference beyond which new requests get RESOURCE_EXHAUSTED (back-pressure).
    max_queued_images: int = 2048
    # Threads decoding and resizing images, off the inference thread.
    # Image decoding threads; 0: one per CPU the process may use.
    decode_workers: int = 0
    max_images_per_request: int = 64
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    # Pixels decoding at once across the decode threads (PixelBudget): two images of the largest size, or many
    # photos; a burst of large ones waits rather than taking the pod past its memory limit.
    max_decoding_pixels: int = 80_000_000
    max_message_bytes: int = 64 * 1024 * 1024
    # Handler threads mostly wait for decoding and the model; calls beyond them wait in gRPC's queue, where
    # max_queued_images cannot see them, so enough of them that the image queue fills first (64 x 64 > 2,048).
    grpc_workers: int = 64
    # RPCs in progress at once; gRPC answers RESOURCE_EXHAUSTED past it (0: unbounded).
    max_concurrent_rpcs: int = 256
    # Close each client connection after this long (GOAWAY; calls in flight get 30 s to finish), so
    # clients reconnect and spread over pods the autoscaler added (0: never).
    max_connection_age_seconds: float = 0.0
    # Let several embedder processes listen on one port (SO_REUSEPORT; the kernel spreads connections).
    reuse_port: bool = False
    grace_seconds: float = 5.0
    # Prometheus /metrics HTTP port; 0 serves none.
    metrics_port: int = 0
    # TLS for the gRPC port, and a plaintext health-only port (kubelet's grpc probes speak no TLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # mTLS: clients must present a certificate signed by a CA in this PEM bundle.
    tls_client_ca: Path | None = None
    health_address: str = ""
    # ROLE SHA256_HEX lines (a Secret mount): every RPC then needs a bearer token of a high enough role.
    auth_tokens: Path | None = None
    # OpenTelemetry: send a span per RPC to this OTLP/gRPC collector (http://host:4317); empty: tracing off.
    otlp_endpoint: str = ""
    # TensorRT engine cache, so a restart does not rebuild engines (minutes on big models).
    tensorrt_cache_dir: Path | None = None
    tensorrt_fp16: bool = True

    def __post_init__(self) -> None:
        unknown = [p for p in self.providers if p not in PROVIDERS]
        if unknown or not self.providers:
            raise ValueError(f"providers {list(self.providers)}: each must be one of {list(PROVIDERS)}")
        check_serving_settings(self)
        for name in ("max_batch", "max_images_per_request", "max_image_bytes", "max_image_pixels",
                     "max_decoding_pixels", "max_queued_images"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_images_per_request > self.max_queued_images:
            raise ValueError(f"max_images_per_request ({self.max_images_per_request}) must not exceed max_queued_images "
                             f"({self.max_queued_images}): a full request could never be queued")
        for name in ("threads", "decode_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (automatic) or more, got {getattr(self, name)}")
        # A NaN or huge delay stopped the batching thread.
        if not 0 <= self.max_delay_ms <= 60_000:
            raise ValueError(f"max_delay_ms must be 0 to 60000, got {self.max_delay_ms}")

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> "EmbedderConfig":
        """Flags override LOOKALIKE_EMBEDDER_<FLAG> environment variables, which override defaults."""
        return parse_config(cls, argv, prog="python -m lookalike.embedder", description="Serve the Lookalike Embedder over gRPC.",
                            env_prefix=ENV_PREFIX, flags={"model_dir": "model"}, helps=HELP)


HELP = {
    "model_dir": "model folder (model.onnx + manifest.json)",
    "address": "host:port to listen on (port 0 picks one, printed at start)",
    "providers": "comma-separated execution providers in priority order: tensorrt,cuda,cpu",
    "threads": "ONNX Runtime intra-op threads (0: one per CPU the cgroup quota allows)",
    "spin_wait": "ONNX Runtime threads busy-wait between batches (lower latency alone, a core's worth of CPU)",
    "max_batch": "largest inference batch",
    "max_delay_ms": "extra wait for a batch to fill, in ms",
    "max_queued_images": "images waiting beyond which requests are refused",
    "decode_workers": "image decoding threads (0: one per CPU the cgroup quota allows)",
    "max_images_per_request": "images per Embed request",
    "max_image_bytes": "bytes per encoded image",
    "max_image_pixels": "pixels decoded per image (decompression-bomb guard; a JPEG decoded at a reduced scale "
                        "counts at that scale)",
    "max_decoding_pixels": "pixels decoding at once across the decode threads (a burst of large photos waits "
                           "instead of taking the pod past its memory limit; a larger image decodes alone)",
    "max_message_bytes": "largest gRPC message",
    "grpc_workers": "gRPC handler threads",
    "max_concurrent_rpcs": "RPCs in progress at once; RESOURCE_EXHAUSTED past it (0: unbounded)",
    "grace_seconds": "drain time on SIGTERM",
    "tensorrt_cache_dir": "where TensorRT keeps built engines between restarts",
    "tensorrt_fp16": "let TensorRT run layers in fp16",
    "metrics_port": "Prometheus /metrics port (0: none)",
    "tls_cert": "PEM certificate chain: serve gRPC over TLS",
    "tls_key": "PEM private key for --tls-cert",
    "tls_client_ca": "PEM CA bundle: require client certificates signed by it (mTLS)",
    "auth_tokens": "file of 'ROLE SHA256_HEX' lines (roles read, write, admin): require bearer tokens",
    "otlp_endpoint": "OTLP/gRPC collector for trace spans, e.g. http://otel-collector:4317 (empty: off)",
    "reuse_port": "let several embedder processes share the port (SO_REUSEPORT; connections are spread)",
    "health_address": "extra plaintext host:port serving only grpc.health.v1 (for kubelet probes under TLS)",
}
