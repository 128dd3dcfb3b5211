"""EmbedderClient: encoded images in, vectors and category probabilities out, over gRPC."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import grpc
import numpy as np

from lookalike.client.connection import ChannelSettings, call_with_retries, status_code
from lookalike.codec import unpack_vector
from lookalike.v1 import embedder_pb2, embedder_pb2_grpc

ImageInput = Union[bytes, str, Path]


@dataclass(frozen=True)
class EmbeddedImage:
    """One image's result: `vector` and `categories` (most probable first), or `error` with its code."""

    id: str
    vector: np.ndarray | None = None
    categories: list[tuple[str, float]] = field(default_factory=list)
    error: str = ""
    error_code: grpc.StatusCode = grpc.StatusCode.OK
    # For a model that crops faces: (left, top, right, bottom) of the face embedded, in the image's pixels.
    face: tuple[int, int, int, int] | None = None

    @property
    def ok(self) -> bool:
        return self.vector is not None

    @property
    def top_category(self) -> str:
        return self.categories[0][0] if self.categories else ""


def read_image(image: ImageInput) -> bytes:
    """Bytes as given, or the contents of a file path."""
    return image if isinstance(image, bytes) else Path(image).read_bytes()


def check_one_per_image(images: Sequence[object], **per_image: Sequence[object] | None) -> None:
    """Refuses per-image lists (ids, categories, ...) that do not have one entry per image: zipped, a short
    one would silently drop images."""
    for name, values in per_image.items():
        if values is not None and len(values) != len(images):
            raise ValueError(f"{name} has {len(values)} entries, expected one per image ({len(images)})")


def embed_requests(images: Sequence[ImageInput], ids: Sequence[str] | None, top_categories: int,
                   max_images: int) -> list[embedder_pb2.EmbedRequest]:
    """The Embed requests for a list of images, each within the server's per-request limit."""
    check_one_per_image(images, ids=ids)
    ids = list(ids) if ids is not None else [str(i) for i in range(len(images))]
    return [embedder_pb2.EmbedRequest(top_categories=top_categories, images=[
        embedder_pb2.Image(data=read_image(image), id=image_id)
        for image, image_id in zip(images[start:start + max_images], ids[start:start + max_images])])
        for start in range(0, len(images), max_images)]


def embedded_image(result: embedder_pb2.EmbedResult) -> EmbeddedImage:
    """One EmbedResult as an EmbeddedImage."""
    if result.HasField("error"):
        return EmbeddedImage(result.id, error=result.error.message, error_code=status_code(result.error.code))
    face = result.embedding.face if result.embedding.HasField("face") else None
    return EmbeddedImage(result.id, vector=unpack_vector(result.embedding.vector),
                         categories=[(c.category, c.probability) for c in result.embedding.categories],
                         face=(face.left, face.top, face.right, face.bottom) if face is not None else None)


class EmbedderClient:
    """Synchronous client for the Embedder service. Use as a context manager to close the channel."""

    def __init__(self, target: str | ChannelSettings) -> None:
        self.settings = target if isinstance(target, ChannelSettings) else ChannelSettings(target)
        self.channel = self.settings.open()
        self.stub = embedder_pb2_grpc.EmbedderStub(self.channel)
        self._max_images: int | None = None

    def model_info(self, timeout: float | None = None) -> embedder_pb2.GetModelInfoResponse:
        """The served model: id, sha256, dimension, labels, active providers, limits."""
        return call_with_retries(self.stub.GetModelInfo, embedder_pb2.GetModelInfoRequest(), self.settings,
                                 timeout, "Embedder.GetModelInfo")

    def embed(self, images: Sequence[ImageInput], ids: Sequence[str] | None = None, top_categories: int = 0,
              timeout: float | None = None) -> list[EmbeddedImage]:
        """Embeds images (bytes or paths), split into requests the server accepts; one result per image."""
        if self._max_images is None:
            self._max_images = self.model_info(timeout).max_images_per_request or 64
        results: list[EmbeddedImage] = []
        for request in embed_requests(images, ids, top_categories, self._max_images):
            response = call_with_retries(self.stub.Embed, request, self.settings, timeout, "Embedder.Embed")
            results.extend(embedded_image(result) for result in response.results)
        return results

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "EmbedderClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
