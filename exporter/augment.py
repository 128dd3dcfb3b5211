"""Training views of decoded photos: mirror, random resized crop and colour jitter, seeded.

Views are made on the embedder's own decoded pixels at the model's input size, so augmentation never sees
a preprocessing path that serving does not use.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance


def mirror(pixels: np.ndarray) -> np.ndarray:
    """Left-right mirror of uint8 [N, H, W, 3] images."""
    return np.ascontiguousarray(pixels[:, :, ::-1])


def random_view(image: np.ndarray, rng: np.random.Generator, min_area: float = 0.5,
                jitter: float = 0.25) -> np.ndarray:
    """One random view of a uint8 [H, W, 3] image: crop of 50-100% of its area (aspect 3:4-4:3), resized back,
    mirrored half the time, brightness, contrast and saturation each scaled by up to +-25%."""
    height, width = image.shape[:2]
    area = rng.uniform(min_area, 1.0) * height * width
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    crop_w = int(round(min(width, np.sqrt(area * aspect))))
    crop_h = int(round(min(height, np.sqrt(area / aspect))))
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    view = Image.fromarray(image[top:top + crop_h, left:left + crop_w]).resize((width, height), Image.BILINEAR)
    if rng.random() < 0.5:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        view = enhancer(view).enhance(float(rng.uniform(1 - jitter, 1 + jitter)))
    return np.asarray(view, dtype=np.uint8)


def training_views(pixels: np.ndarray, view: int, rng: np.random.Generator) -> np.ndarray:
    """View number `view` of a batch: 0 the photos as served, 1 their mirrors, 2+ random views."""
    if view == 0:
        return pixels
    if view == 1:
        return mirror(pixels)
    return np.stack([random_view(image, rng) for image in pixels])
