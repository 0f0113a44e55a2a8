"""WideResNet-28-10 (Zagoruyko & Komodakis 2016), pre-activation, for CIFAR-100: the CIFAR-100 baseline.

conv3x3 3->16; three groups of (depth-4)/6 blocks at widths 16k, 32k, 64k (strides 1, 2, 2); a block is
BN-ReLU-conv3x3-BN-ReLU-conv3x3 with a 1x1 projection shortcut when the shape changes; final BN-ReLU,
global average pool, linear classifier. Convolutions have no bias.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from micronet_score.models.registry import ModelSpec, image_of, register
from torch import nn


class Block(nn.Module):
    """Pre-activation basic block: x + conv(relu(bn(conv(relu(bn(x))))))."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.relu(self.bn2(y)))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 100):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks = []
        for group, stride in enumerate((1, 2, 2)):
            for i in range(n):
                blocks.append(
                    Block(widths[group] if i == 0 else widths[group + 1], widths[group + 1], stride if i == 0 else 1)
                )
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.conv(x))
        x = self.pool(self.relu(self.bn(x)))
        return self.fc(torch.flatten(x, 1))


def build(config: Mapping[str, Any]) -> WideResNet:
    return WideResNet(int(config.get("depth", 28)), int(config.get("widen", 10)), int(config.get("num_classes", 100)))


register(
    ModelSpec(
        name="wrn-28-10",
        title="WideResNet-28-10 (pre-activation), CIFAR-100 baseline",
        track="cifar100",
        build=build,
        default_config={"depth": 28, "widen": 10, "num_classes": 100},
        example_inputs=image_of("cifar100"),
        aliases=("wrn",),
    )
)
