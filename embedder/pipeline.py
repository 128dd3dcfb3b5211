"""The embedder's core: decode in a worker pool, batch across requests, run the model."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from lookalike.embedder.batcher import Abandoned, MicroBatcher, never_abandoned
from lookalike.embedder.config import EmbedderConfig
from lookalike.embedder.model import OnnxModel
from lookalike.embedder.preprocess import Box, ImageLimits, PixelBudget, decode_face_image
from lookalike.serving.cpus import available_cpus
from lookalike.serving.errors import DeadlineExceeded, ServiceError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageResult:
    """One image's outcome: (embedding, probabilities), or the error that stopped it."""

    embedding: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    error: ServiceError | None = None
    # The face region embedded, for models that crop faces.
    face: Box | None = None


class EmbeddingPipeline:
    """Encoded images -> embeddings and category probabilities, one result per image."""

    def __init__(self, model: OnnxModel, config: EmbedderConfig) -> None:
        self.model = model
        self.limits = ImageLimits(max_bytes=config.max_image_bytes, max_pixels=config.max_image_pixels)
        self.budget = PixelBudget(config.max_decoding_pixels)
        self._decoders = ThreadPoolExecutor(max_workers=config.decode_workers or available_cpus(),
                                            thread_name_prefix="decode")
        self.batcher = MicroBatcher(model.run, config.max_batch, config.max_delay_ms / 1000.0,
                                    config.max_queued_images)

    def _decode(self, index: int, data: bytes, abandoned: Abandoned) -> tuple[np.ndarray, Box | None] | ServiceError:
        if abandoned():  # each image checks: a large request's caller may leave while its first images decode
            return DeadlineExceeded(f"images[{index}] was not decoded: the call ended (its deadline passed or it "
                                    "was cancelled)")
        try:
            return decode_face_image(data, self.model.input_size, self.limits, name=f"images[{index}]",
                                     face_crop=self.model.face_crop, budget=self.budget)
        except ServiceError as error:
            return error

    def embed(self, images: Sequence[bytes], abandoned: Abandoned = never_abandoned) -> list[ImageResult]:
        """Decodes every image (bad ones get their own error), then embeds the good ones in one go. Once
        `abandoned()` says nobody waits for the answer, the work left is skipped (DeadlineExceeded)."""
        if abandoned():
            raise DeadlineExceeded("the call ended (its deadline passed or it was cancelled) before its images "
                                   "were decoded")
        decoded = list(self._decoders.map(self._decode, range(len(images)), images, [abandoned] * len(images)))
        if abandoned():
            raise DeadlineExceeded("the call ended (its deadline passed or it was cancelled) while its images were "
                                   "decoded")
        good = [(i, item) for i, item in enumerate(decoded) if not isinstance(item, ServiceError)]
        results = [ImageResult(error=item) if isinstance(item, ServiceError) else None for item in decoded]
        if good:
            embeddings, probabilities = self.batcher.run(np.stack([pixels for _, (pixels, _) in good]),
                                                         abandoned=abandoned)
            for row, (i, (_, face)) in enumerate(good):
                results[i] = ImageResult(embedding=embeddings[row], probabilities=probabilities[row], face=face)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self.batcher.close()
        self._decoders.shutdown(wait=True, cancel_futures=True)  # decodes not started are for calls now refused
