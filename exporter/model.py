"""The exported network: uint8 images in, (unit-length embedding, category probabilities) out."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lookalike.exporter.efficientnet_lite import PIXEL_MEAN, PIXEL_STD, EfficientNetLite


def scaled_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC RGB -> the checkpoint's float NCHW input scaling."""
    return (images.permute(0, 3, 1, 2).float() - PIXEL_MEAN) / PIXEL_STD


class LookalikeNet(nn.Module):
    """Backbone + optional embedding projection + category head, with the input scaling inside.

    Input: uint8 [N, H, W, 3] RGB. Outputs: embedding float32 [N, D] with L2 norm 1, and
    probabilities float32 [N, C] = softmax(head(normalised features) / temperature).
    Scaling lives in the graph so serving can never drift from training.
    """

    def __init__(self, backbone: EfficientNetLite, head: nn.Linear, projection: nn.Module | None = None,
                 temperature: float = 1.0, head_on_embedding: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = projection
        self.head = head
        # The category head reads the backbone features, or (when that classified better) the trained embedding.
        self.head_on_embedding = head_on_embedding
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = F.normalize(self.backbone.features(scaled_input(images)), dim=1)
        embedding = features if self.projection is None else F.normalize(self.projection(features), dim=1)
        logits = self.head(embedding if self.head_on_embedding else features)
        probabilities = torch.softmax(logits / self.temperature, dim=1)
        return embedding, probabilities


class TrunkNet(nn.Module):
    """uint8 images -> what fine-tuning caches: the activations entering block `split`, or (split=None)
    the pooled, normalised features of the whole backbone."""

    def __init__(self, backbone: EfficientNetLite, split: int | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.split = split

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = scaled_input(images)
        if self.split is None:
            return F.normalize(self.backbone.features(x), dim=1)
        return self.backbone.trunk(x, self.split)
