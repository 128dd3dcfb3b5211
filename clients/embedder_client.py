"""EmbedderClient: encoded images in, vectors and category probabilities out, over gRPC."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import grpc
import numpy as np

from lookalike.client.connection import (ChannelSettings, call_with_retries, channel_settings, deadline_after,
                                         status_code, time_left)
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
    one would silently drop images. A string or bytes given for a list is refused too: iterated, it would be
    one image, id or category per character."""
    for name, values in {"images": images, **per_image}.items():
        if isinstance(values, (str, bytes, Path)):
            raise TypeError(f"{name} is a {type(values).__name__}, expected a list with one entry per image "
                            "(one image goes in a list of one)")
    for name, values in per_image.items():
        if values is not None and len(values) != len(images):
            raise ValueError(f"{name} has {len(values)} entries, expected one per image ({len(images)})")


def check_entries(name: str, values: Sequence[object] | None, types: type | tuple[type, ...], expected: str) -> None:
    """Refuses a list entry of a type its message field cannot carry, before anything is sent."""
    for position, value in enumerate(values or ()):
        if not isinstance(value, types):
            raise TypeError(f"{name}[{position}] is a {type(value).__name__}, expected {expected}")


# What an image adds to a request besides its bytes and id: field tags and length prefixes.
IMAGE_FRAMING_BYTES = 16
# Room kept below the message-size limit for the request's own fields.
REQUEST_FRAMING_BYTES = 64 * 1024
# What a server too old to report its limits accepts by default.
DEFAULT_MAX_IMAGES = 64
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class RequestLimits:
    """How much one Embed request may carry: the server's image count, and the smaller of the server's and the
    channel's message size."""

    images: int
    bytes: int

    @classmethod
    def of(cls, info: embedder_pb2.GetModelInfoResponse, settings: ChannelSettings) -> "RequestLimits":
        message_bytes = min(info.max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES, settings.max_message_bytes)
        return cls(info.max_images_per_request or DEFAULT_MAX_IMAGES, message_bytes - REQUEST_FRAMING_BYTES)


@dataclass(frozen=True)
class EmbedPlan:
    """What embed sends for a list of images: the requests, and for each image its result decided before
    sending (a file that cannot be read, an image no request can carry), or None for an image that travels in
    `requests`."""

    requests: list[embedder_pb2.EmbedRequest]
    refused: list[EmbeddedImage | None]

    def results(self, responses: Sequence[embedder_pb2.EmbedResponse]) -> list[EmbeddedImage]:
        """One result per image, in the images' order, given the responses to `requests`."""
        sent = iter([embedded_image(result) for response in responses for result in response.results])
        return [result if result is not None else next(sent) for result in self.refused]


def check_embed_arguments(images: Sequence[ImageInput], ids: Sequence[str] | None) -> None:
    """Refuses images and ids no request can carry, before anything is sent (the model's limits are asked
    first)."""
    check_one_per_image(images, ids=ids)
    check_entries("images", images, (bytes, str, os.PathLike), "bytes or a file path")
    check_entries("ids", ids, str, "a str")


def embed_plan(images: Sequence[ImageInput], ids: Sequence[str] | None, top_categories: int,
               limits: RequestLimits) -> EmbedPlan:
    """The Embed requests for a list of images, each within the server's image count and message size, so
    one bad image fails alone. A file that cannot be read gets INVALID_ARGUMENT, as bytes that are not an image
    do. An image larger than a request can carry is not sent (the server would refuse its whole request): it
    gets RESOURCE_EXHAUSTED, as an image over the server's per-image limit does."""
    check_embed_arguments(images, ids)
    ids = list(ids) if ids is not None else [str(i) for i in range(len(images))]
    requests: list[embedder_pb2.EmbedRequest] = []
    refused: list[EmbeddedImage | None] = []
    size = 0
    for image, image_id in zip(images, ids):
        try:
            data = read_image(image)
        except (OSError, ValueError) as error:  # ValueError: a path no file can have (a NUL byte, say)
            refused.append(EmbeddedImage(image_id, error_code=grpc.StatusCode.INVALID_ARGUMENT,
                                         error=f"cannot read the image file: {error}"))
            continue
        image_size = len(data) + len(image_id.encode()) + IMAGE_FRAMING_BYTES
        if image_size > limits.bytes:
            refused.append(EmbeddedImage(image_id, error_code=grpc.StatusCode.RESOURCE_EXHAUSTED,
                                         error=f"image has {len(data)} bytes, more than the {limits.bytes} an Embed "
                                               "request can carry (the smaller of the server's and the channel's "
                                               "max_message_bytes, less framing)"))
            continue
        refused.append(None)
        if not requests or len(requests[-1].images) == limits.images or size + image_size > limits.bytes:
            requests.append(embedder_pb2.EmbedRequest(top_categories=top_categories))
            size = 0
        requests[-1].images.add(data=data, id=image_id)
        size += image_size
    return EmbedPlan(requests, refused)


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
        self.settings = channel_settings(target)
        self.channel = self.settings.open()
        self.stub = embedder_pb2_grpc.EmbedderStub(self.channel)
        self._limits: RequestLimits | None = None

    def model_info(self, timeout: float | None = None) -> embedder_pb2.GetModelInfoResponse:
        """The served model: id, sha256, dimension, labels, active providers, limits."""
        return call_with_retries(self.stub.GetModelInfo, embedder_pb2.GetModelInfoRequest(), self.settings,
                                 timeout, "Embedder.GetModelInfo")

    def embed(self, images: Sequence[ImageInput], ids: Sequence[str] | None = None, top_categories: int = 0,
              timeout: float | None = None) -> list[EmbeddedImage]:
        """Embeds images (bytes or paths), split into requests the server accepts; one result per image.
        `timeout` bounds all of it, every request and retry."""
        deadline = deadline_after(timeout)
        check_embed_arguments(images, ids)
        if self._limits is None:
            self._limits = RequestLimits.of(self.model_info(time_left(deadline, "Embedder.GetModelInfo")),
                                            self.settings)
        plan = embed_plan(images, ids, top_categories, self._limits)
        return plan.results([call_with_retries(self.stub.Embed, request, self.settings,
                                               time_left(deadline, "Embedder.Embed"), "Embedder.Embed")
                             for request in plan.requests])

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "EmbedderClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
