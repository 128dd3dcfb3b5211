"""Training views of decoded photos: mirror, random resized crop and colour jitter, seeded.

Views are made on the embedder's own decoded pixels at the model's input size, so augmentation never sees
a preprocessing path that serving does not use. `random_view` makes cached views with Pillow on the CPU;
`random_views_batch` makes the same kind of view for a whole batch on the training device, fresh every
epoch, for whole-network fine-tuning.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch.nn import functional as F

# ITU-R 601 luma, as Pillow's convert("L") that its Contrast and Color enhancers use.
_LUMA = (0.299, 0.587, 0.114)


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


def random_views_batch(pixels: torch.Tensor, generator: torch.Generator, min_area: float = 0.5,
                       jitter: float = 0.25) -> torch.Tensor:
    """`random_view` for a batch on its own device: uint8 or float [N, H, W, 3] -> float [N, H, W, 3] in 0-255.

    Same distribution: crop of 50-100% of the area (aspect 3:4-4:3) resized back with bilinear sampling,
    mirrored half the time, then brightness, contrast and saturation each scaled by up to +-25% the way
    Pillow's enhancers do it. `generator` lives on the pixels' device and makes the views reproducible.
    """
    count, height, width, _ = pixels.shape

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.empty(count, device=pixels.device).uniform_(low, high, generator=generator)

    area = uniform(min_area, 1.0) * height * width
    aspect = torch.exp(uniform(float(np.log(3 / 4)), float(np.log(4 / 3))))
    crop_w = torch.sqrt(area * aspect).clamp(max=width) / width
    crop_h = torch.sqrt(area / aspect).clamp(max=height) / height
    mirrored = torch.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0)
    theta = torch.zeros(count, 2, 3, device=pixels.device)
    theta[:, 0, 0] = crop_w * mirrored
    theta[:, 1, 1] = crop_h
    theta[:, 0, 2] = (1 - crop_w) * uniform(-1.0, 1.0)
    theta[:, 1, 2] = (1 - crop_h) * uniform(-1.0, 1.0)
    images = pixels.permute(0, 3, 1, 2).float()
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    luma = torch.tensor(_LUMA, device=pixels.device).view(1, 3, 1, 1)

    def blend(degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        return (degenerate + factor.view(-1, 1, 1, 1) * (images - degenerate)).clamp(0, 255)

    images = blend(torch.zeros_like(images), uniform(1 - jitter, 1 + jitter))
    grey_mean = (images * luma).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    images = blend(grey_mean.expand_as(images), uniform(1 - jitter, 1 + jitter))
    images = blend((images * luma).sum(1, keepdim=True).expand_as(images), uniform(1 - jitter, 1 + jitter))
    return images.permute(0, 2, 3, 1)
