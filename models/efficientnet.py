"""EfficientNet-B0 for ImageNet, 224x224 (Tan & Le, 2019).

Stem conv3x3 stride 2, 3 -> 32, BN, swish; seven stages of MBConv blocks; head conv1x1 320 -> 1280, BN, swish;
global average pool; fc 1280 -> 1000. An MBConv block with expansion t, kernel k and stride s::

    [conv1x1 cin -> t*cin, BN, swish]  (only when t > 1)
    depthwise conv kxk stride s, BN, swish
    squeeze-and-excitation: global avg pool -> conv1x1 (bias) t*cin -> max(1, cin/4) -> swish
                            -> conv1x1 (bias) -> t*cin -> sigmoid -> scale the channels
    conv1x1 t*cin -> cout, BN             (no activation)
    + x when s = 1 and cin = cout         (drop-connect is training-only)

Convolutions other than SE's have no bias; batch norms have eps 1e-3 as in the reference implementation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from micronet_score.models.registry import ModelSpec, image_of, register
from torch import Tensor, nn

# (expansion, kernel, stride, output channels, repeats) per stage, for width and depth multipliers 1.0.
B0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
DEFAULT_CONFIG: dict[str, Any] = {"num_classes": 1000, "stem": 32, "head": 1280, "se_ratio": 0.25}
BN_EPS = 1e-3


def conv_bn_act(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """conv (no bias, 'same' padding) -> BN -> swish (or no activation)."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout, eps=BN_EPS),
    ]
    if act:
        layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """Channel gates from the pooled input: sigmoid(conv(swish(conv(mean))))."""

    def __init__(self, channels: int, squeezed: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        gate = self.expand(self.act(self.reduce(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class MBConv(nn.Module):
    """Mobile inverted bottleneck with squeeze-and-excitation."""

    def __init__(self, cin: int, cout: int, expansion: int, kernel: int, stride: int, se_ratio: float):
        super().__init__()
        mid = cin * expansion
        self.expand = conv_bn_act(cin, mid, 1) if expansion != 1 else nn.Identity()
        self.depthwise = conv_bn_act(mid, mid, kernel, stride, groups=mid)
        self.se = SqueezeExcite(mid, max(1, int(cin * se_ratio)))
        self.project = conv_bn_act(mid, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = self.project(self.se(self.depthwise(self.expand(x))))
        return out + x if self.residual else out


class EfficientNet(nn.Module):
    """EfficientNet-B0 (width and depth multipliers 1.0, 224x224)."""

    def __init__(self, num_classes: int = 1000, stem: int = 32, head: int = 1280, se_ratio: float = 0.25):
        super().__init__()
        self.stem = conv_bn_act(3, stem, 3, stride=2)
        blocks = []
        cin = stem
        for expansion, kernel, stride, cout, repeats in B0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, expansion, kernel, stride if i == 0 else 1, se_ratio))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = conv_bn_act(cin, head, 1)
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


def build(config: Mapping[str, Any]) -> EfficientNet:
    return EfficientNet(config["num_classes"], config["stem"], config["head"], config["se_ratio"])


register(
    ModelSpec(
        name="efficientnet-b0",
        title="EfficientNet-B0 (ImageNet, 224x224)",
        track="imagenet",
        build=build,
        default_config=DEFAULT_CONFIG,
        example_inputs=image_of("imagenet"),
        aliases=("efficientnet",),
    )
)
