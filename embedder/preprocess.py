"""Decoding encoded images into the model's uint8 input, with per-image limits.

The exporter uses the same function when it fits and checks the model, so training and serving see
identical pixels.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from lookalike.serving.errors import InvalidArgument, ResourceExhausted

# Our own pixel limit (ImageLimits.max_pixels) is checked from the header before decoding, with a
# message naming the limit; Pillow's global bomb check would pre-empt it with a different text.
Image.MAX_IMAGE_PIXELS = None

# Transparent pixels become white: catalogue cut-outs are shot on white, not black.
_BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class ImageLimits:
    """Per-image limits enforced before any pixel is decoded."""

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000


def decode_image(data: bytes, size: tuple[int, int], limits: ImageLimits = ImageLimits(),
                 name: str = "image") -> np.ndarray:
    """Encoded image bytes -> uint8 RGB array of shape (height, width, 3) at `size` = (width, height).

    EXIF orientation is applied; greyscale, palette, CMYK and alpha images become RGB (alpha over
    white); the whole picture is resized (no crop) with bilinear filtering. `name` prefixes errors.
    Raises InvalidArgument for empty, unreadable or corrupt data and ResourceExhausted for data over
    the limits.
    """
    if not data:
        raise InvalidArgument(f"{name} is empty (0 bytes), expected an encoded JPEG, PNG or WebP image")
    if len(data) > limits.max_bytes:
        raise ResourceExhausted(f"{name} has {len(data)} bytes, limit is {limits.max_bytes} bytes per image")
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as error:  # noqa: BLE001 - Pillow raises many types for foreign data
        raise InvalidArgument(
            f"{name} is not a readable image ({type(error).__name__}), expected JPEG, PNG, WebP, GIF, BMP or TIFF"
        ) from error
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ResourceExhausted(
            f"{name} is {width}x{height} = {width * height} pixels, limit is {limits.max_pixels} pixels per image"
        )
    if width == 0 or height == 0:
        raise InvalidArgument(f"{name} is {width}x{height} pixels, expected at least 1x1")
    try:
        # JPEG can decode at 1/2, 1/4, 1/8 scale for free; draft never goes below the requested size.
        image.draft("RGB", size)
        image.load()
        image = _upright(image)
        image = _to_rgb(image)
        image = image.resize(size, Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)
    except Exception as error:  # noqa: BLE001 - truncated or corrupt data surfaces as many types
        raise InvalidArgument(f"{name} could not be decoded, the data is truncated or corrupt: {error}") from error


def _upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says; as it is when the EXIF block is unreadable (browsers
    show such photos too, so refusing them would surprise the shopper)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a corrupt EXIF block surfaces as many types
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited over a white background."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16"):
        # 16-bit greyscale (PNG): Pillow's convert would clip at 255 instead of rescaling.
        array = np.asarray(image, dtype=np.float32) / 257.0
        image = Image.fromarray(array.round().astype(np.uint8))
    return image.convert("RGB")
