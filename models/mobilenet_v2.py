"""MobileNetV2 (Sandler et al. 2018) with a width multiplier; width 1.4 at 224x224 is the ImageNet baseline.

Stem conv3x3 stride 2; inverted residual blocks (t, c, n, s): 1x1 expansion by t, 3x3 depthwise, 1x1
projection, residual when the shape is kept; last 1x1 conv to 1280 (scaled when width > 1); classifier.
Every conv is followed by batch norm; ReLU6 after all but the projection. Channels: make_divisible(c * width, 8).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from micronet_score.models.registry import ModelSpec, image_of, register
from torch import nn

SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of divisor, never more than 10% below the value (TF-slim's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [conv_bn(cin, hidden, 1)]
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, cout, 1, relu=False)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    def __init__(self, width: float = 1.4, num_classes: int = 1000):
        super().__init__()
        cin = make_divisible(32 * width)
        last = make_divisible(1280 * max(1.0, width))
        layers: list[nn.Module] = [conv_bn(3, cin, 3, 2)]
        for t, c, n, s in SETTINGS:
            cout = make_divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(conv_bn(cin, last, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def build(config: Mapping[str, Any]) -> MobileNetV2:
    return MobileNetV2(float(config.get("width", 1.4)), int(config.get("num_classes", 1000)))


register(
    ModelSpec(
        name="mobilenet-v2",
        title="MobileNetV2 (width 1.4), ImageNet baseline",
        track="imagenet",
        build=build,
        default_config={"width": 1.4, "num_classes": 1000},
        example_inputs=image_of("imagenet"),
        aliases=("mobilenetv2",),
    )
)
