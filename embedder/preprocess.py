"""Decoding encoded images into the model's uint8 input, with per-image limits.

The exporter uses the same function when it fits and checks the model, so training and serving see
identical pixels.
"""
from __future__ import annotations

import ctypes
import importlib.util
import io
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from lookalike.pixels import to_rgb, upright
from lookalike.serving.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from lookalike.v1 import manifest_pb2

# Our own pixel limit (ImageLimits.max_pixels) is checked from the header before decoding, with a
# message naming the limit; Pillow's global bomb check would pre-empt it with a different text.
Image.MAX_IMAGE_PIXELS = None

# The formats decoded. Pillow opens many more, and some of those (ICO, ICNS) decode the whole picture while
# opening it or report a size other than the one they decode, which would pass the pixel limit below.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")
FORMAT_NAMES = "JPEG, PNG, WebP, GIF, BMP, TIFF or PNM (PGM/PPM)"



@dataclass(frozen=True)
class ImageLimits:
    """Per-image limits enforced before any pixel is decoded."""

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000


HAAR_FRONTAL_FACE = "opencv-haar-frontalface-default"
DLIB_HOG_ALIGNED = "dlib-hog-5point-aligned"
FACE_DETECTORS = (HAAR_FRONTAL_FACE, DLIB_HOG_ALIGNED)
# (left, top, right, bottom) in pixels of the upright image.
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class FaceCrop:
    """The manifest's face crop (manifest_pb2.FaceCrop): which face to cut out before resizing, and how."""

    # dlib's aligned crop with margin 0.4 found the unseen validation people best, in scenes and alone
    # (BENCHMARKS.md, "Face retrieval on ORL").
    detector: str = DLIB_HOG_ALIGNED
    margin: float = 0.4
    no_face: str = "fail"  # or "whole_image"
    scale_factor: float = 1.1
    min_neighbors: int = 5
    min_size: float = 0.1
    upsample: int = 0

    def __post_init__(self) -> None:
        if self.detector not in FACE_DETECTORS:
            raise ValueError(f"face_crop.detector is {self.detector!r}, expected one of {', '.join(FACE_DETECTORS)}")
        if self.no_face not in ("fail", "whole_image"):
            raise ValueError(f"face_crop.no_face is {self.no_face!r}, expected 'fail' or 'whole_image'")

    @classmethod
    def from_manifest(cls, spec: manifest_pb2.InputSpec) -> "FaceCrop | None":
        if not spec.HasField("face_crop"):
            return None
        crop = spec.face_crop
        try:
            # float32 in the manifest: rounded back to the decimals they were written with.
            return cls(detector=crop.detector, margin=round(crop.margin, 6), no_face=crop.no_face,
                       scale_factor=round(crop.scale_factor, 6), min_neighbors=crop.min_neighbors,
                       min_size=round(crop.min_size, 6), upsample=crop.upsample)
        except ValueError as error:
            raise ValueError(f"input.{error}") from None

    def to_manifest(self) -> manifest_pb2.FaceCrop:
        return manifest_pb2.FaceCrop(detector=self.detector, margin=self.margin, no_face=self.no_face,
                                     scale_factor=self.scale_factor, min_neighbors=self.min_neighbors,
                                     min_size=self.min_size, upsample=self.upsample)


# Neither OpenCV's cascade nor dlib's detector is documented as safe to share between threads: one of each
# per decode thread.
_detectors = threading.local()
# cv2's package bootstrap swaps modules while it imports: decode threads importing it at once saw a
# half-made module (no cv2.data), so the first import and each detector's creation are serialised (dlib's
# too, for the same reason).
_import_lock = threading.Lock()


def _haar_detector() -> Any:
    detector = getattr(_detectors, "haar", None)
    if detector is None:
        with _import_lock:
            import cv2  # opencv-python-headless, only for models that crop faces

            detector = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
        if detector.empty():
            raise RuntimeError("OpenCV's haarcascade_frontalface_default.xml did not load")
        _detectors.haar = detector
    return detector


def _dlib_models() -> tuple[Any, Any]:
    """(HOG face detector, 5-point landmark predictor) of this thread."""
    models = getattr(_detectors, "dlib", None)
    if models is None:
        with _import_lock:
            import dlib  # dlib-bin, only for models that crop faces with it

            # face_recognition_models' __init__ needs pkg_resources, gone from current setuptools: its data
            # file is found through the package's location instead of importing it.
            package = importlib.util.find_spec("face_recognition_models")
            if package is None or not package.submodule_search_locations:
                raise RuntimeError("face-recognition-models is not installed (it ships dlib's landmark model)")
            landmarks = Path(package.submodule_search_locations[0]) / "models" / "shape_predictor_5_face_landmarks.dat"
            models = (dlib.get_frontal_face_detector(), dlib.shape_predictor(str(landmarks)))
        _detectors.dlib = models
    return models


def face_box(image: Image.Image, crop: FaceCrop) -> Box | None:
    """(left, top, right, bottom) of the largest face the detector finds, with the margin, clamped to the
    image; None when it finds none. (See `cut_face` for the pixels.)"""
    face = cut_face(image, crop, (8, 8))
    return face[1] if face is not None else None


def cut_face(image: Image.Image, crop: FaceCrop, size: tuple[int, int]) -> tuple[Image.Image, Box] | None:
    """The largest face in `image` as the model sees it before the final resize, and its box; None when the
    detector finds no face. Haar: the box squared and clamped. dlib: the face turned eyes-level, `size`'s
    longer side square (the chip dlib cuts); its box is the chip's square before turning."""
    if crop.detector == DLIB_HOG_ALIGNED:
        return _cut_aligned_face(image, crop, max(size))
    box = _haar_box(image, crop)
    return (image.crop(box), box) if box is not None else None


def _haar_box(image: Image.Image, crop: FaceCrop) -> Box | None:
    grey = np.asarray(image.convert("L"))
    smallest = max(1, int(crop.min_size * min(grey.shape)))
    faces = _haar_detector().detectMultiScale(grey, scaleFactor=crop.scale_factor, minNeighbors=crop.min_neighbors,
                                              minSize=(smallest, smallest))
    if len(faces) == 0:
        return None
    x, y, w, h = (int(v) for v in max(faces, key=lambda box: (box[2] * box[3], -box[0], -box[1])))
    side = min(round(max(w, h) * (1 + 2 * crop.margin)), image.width, image.height)
    left = min(max(x + w // 2 - side // 2, 0), image.width - side)
    top = min(max(y + h // 2 - side // 2, 0), image.height - side)
    return left, top, left + side, top + side


def _cut_aligned_face(image: Image.Image, crop: FaceCrop, side: int) -> tuple[Image.Image, Box] | None:
    import dlib

    detector, landmarks = _dlib_models()
    pixels = np.asarray(image)
    faces = detector(pixels, crop.upsample)
    if len(faces) == 0:
        return None
    face = max(faces, key=lambda rect: (rect.area(), -rect.left(), -rect.top()))
    shape = landmarks(pixels, face)
    chip = dlib.get_face_chip(pixels, shape, size=side, padding=crop.margin)
    square = dlib.get_face_chip_details(shape, size=side, padding=crop.margin).rect
    box = (max(0, round(square.left())), max(0, round(square.top())),
           min(image.width, round(square.right())), min(image.height, round(square.bottom())))
    return Image.fromarray(chip), box


def decode_image(data: bytes, size: tuple[int, int], limits: ImageLimits = ImageLimits(),
                 name: str = "image", face_crop: FaceCrop | None = None) -> np.ndarray:
    """Encoded image bytes -> uint8 RGB array of shape (height, width, 3) at `size` = (width, height).
    See `decode_face_image`, which also says where the face was."""
    return decode_face_image(data, size, limits, name, face_crop)[0]


def _corrupt(name: str, error: Exception) -> InvalidArgument:
    return InvalidArgument(f"{name} could not be decoded, the data is truncated or corrupt: {error}")


def _glibc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # another C library: it keeps what it keeps
        return None


GLIBC = _glibc()
# A decode this large gives its memory back when it ends (below that, the heap's reuse is worth more).
LARGE_DECODE_PIXELS = 4_000_000


class PixelBudget:
    """Pixels being decoded at once across threads. A decode holds its image's pixels (counted after a JPEG's
    draft) from decoding to the resized result, waiting while the others hold too many: a decode peaks near
    8 bytes a decoded pixel (a 36-megapixel PNG: about 280 MB), so threads sized to the cores could together
    take a pod past its memory limit on a burst of large photos (`lookalike bench decoding`). An image larger
    than the whole budget decodes alone."""

    def __init__(self, pixels: int) -> None:
        self.pixels = pixels
        self.held = 0
        self._changed = threading.Condition()

    @contextmanager
    def holding(self, pixels: int) -> Iterator[None]:
        held = min(pixels, self.pixels)
        with self._changed:
            self._changed.wait_for(lambda: self.held + held <= self.pixels)
            self.held += held
        try:
            yield
        finally:
            if pixels >= LARGE_DECODE_PIXELS and GLIBC is not None:
                # glibc keeps a freed image in its thread's heap: each decode thread kept its largest one
                # resident for good, and the budget bounded nothing (measured: BENCHMARKS.md).
                GLIBC.malloc_trim(0)
            with self._changed:
                self.held -= held
                self._changed.notify_all()


def decode_face_image(data: bytes, size: tuple[int, int], limits: ImageLimits = ImageLimits(),
                      name: str = "image", face_crop: FaceCrop | None = None,
                      budget: PixelBudget | None = None) -> tuple[np.ndarray, Box | None]:
    """Encoded image bytes -> (uint8 RGB array of shape (height, width, 3) at `size` = (width, height), the
    face box embedded or None).

    EXIF orientation is applied; greyscale, palette, CMYK and alpha images become RGB (alpha over
    white); the whole picture, or with `face_crop` its largest face, is resized with bilinear filtering.
    `name` prefixes errors. Raises InvalidArgument for empty, unreadable or corrupt data,
    ResourceExhausted for data over the limits, and FailedPrecondition when a face is needed and none
    is found. With `budget`, the decode waits for its pixels there (see PixelBudget).
    """
    if not data:
        raise InvalidArgument(f"{name} is empty (0 bytes), expected an encoded JPEG, PNG or WebP image")
    if len(data) > limits.max_bytes:
        raise ResourceExhausted(f"{name} has {len(data)} bytes, limit is {limits.max_bytes} bytes per image")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Exception as error:  # noqa: BLE001 - Pillow raises many types for foreign data
        raise InvalidArgument(f"{name} is not a readable image ({type(error).__name__}), expected {FORMAT_NAMES}"
                              ) from error
    width, height = image.size
    if width == 0 or height == 0:
        raise InvalidArgument(f"{name} is {width}x{height} pixels, expected at least 1x1")
    try:
        if face_crop is None:
            # JPEG can decode at 1/2, 1/4, 1/8 scale for free; draft never goes below the requested size.
            # (Not with a face crop: the face is a part of the photo and needs its pixels.)
            image.draft("RGB", size)
    except Exception as error:  # noqa: BLE001 - a corrupt header surfaces as many types
        raise _corrupt(name, error) from error
    # The limit is on the pixels decoded: a 60-megapixel camera JPEG decodes at an eighth of its size.
    decoded_width, decoded_height = image.size
    if decoded_width * decoded_height > limits.max_pixels:
        at = "" if image.size == (width, height) else f", decoded at {decoded_width}x{decoded_height}"
        raise ResourceExhausted(f"{name} is {width}x{height}{at} = {decoded_width * decoded_height} pixels, "
                                f"limit is {limits.max_pixels} pixels per image")
    with budget.holding(decoded_width * decoded_height) if budget is not None else nullcontext():
        try:
            image.load()
            image = upright(image)
            image = to_rgb(image)
        except Exception as error:  # noqa: BLE001 - truncated or corrupt data surfaces as many types
            raise _corrupt(name, error) from error
        face = cut_face(image, face_crop, size) if face_crop is not None else None
        box = None
        if face is not None:
            image, box = face
        elif face_crop is not None and face_crop.no_face == "fail":
            raise FailedPrecondition(f"{name} shows no face the detector finds, and this model embeds faces "
                                     "(its manifest's input.face_crop.no_face is 'fail')")
        pixels = np.asarray(image.resize(size, Image.Resampling.BILINEAR), dtype=np.uint8)
        del image, face  # freed within the budget's turn, so its end can give the memory back
    return pixels, box
