"""PyramidNet for CIFAR (Han et al.) with bottleneck blocks and ShakeDrop, as Wave Computing started from it.

PyramidNet-272, alpha 200: 3 stages of n = (272 - 2) / 9 = 30 pre-activation bottleneck blocks. The bottleneck
width grows by alpha / 3n per block from 16 (``planes = round(16 + i * alpha / 3n)``); a block outputs 4 * planes
channels::

    residual = BN -> conv1x1 -> BN -> ReLU -> conv3x3 (stride) -> BN -> ReLU -> conv1x1 (4 planes) -> BN -> ShakeDrop
    shortcut = x, or AvgPool2d(2) when the block has stride 2; zero-padded in channels to the residual's width

At evaluation ShakeDrop is its expectation: the residual times (1 - p_l), p_l = 0.5 * l / 90 for block l = 1..90.
Stem: conv3x3 3->16, BN (no ReLU). Head: BN, ReLU, AvgPool2d(8), fc 864 -> classes.

The convolutions, the fc and the batch norms come from a :class:`LayerFactory`, so that Wave Computing's pruned
variant (factorised layers, merged batch norms) shares this file's structure; see ``wave_pyramidnet``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from micronet_score.models.registry import ModelSpec, image_of, register
from torch import Tensor, nn
from torch.nn import functional as F

DEFAULT_CONFIG: dict[str, Any] = {"depth": 272, "alpha": 200, "num_classes": 100}


def stage_widths(depth: int = 272, alpha: float = 200) -> list[list[int]]:
    """The bottleneck widths ("planes") of every block, per stage."""
    if (depth - 2) % 9:
        raise ValueError(f"a bottleneck PyramidNet has depth 9n + 2 (got {depth})")
    blocks = (depth - 2) // 9
    step = alpha / (3 * blocks)
    width = 16.0
    stages = []
    for _ in range(3):
        planes = []
        for _ in range(blocks):
            width += step
            planes.append(round(width))
        stages.append(planes)
    return stages


class LayerFactory:
    """Makes the network's weight layers by name (their path in the model); the plain, dense kind."""

    def conv(self, name: str, cin: int, cout: int, kernel: int, stride: int) -> nn.Module:
        return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)

    def fc(self, name: str, cin: int, cout: int) -> nn.Module:
        return nn.Linear(cin, cout)

    def norm(self, name: str, channels: int, mergeable: bool) -> nn.Module:
        """A batch norm; ``mergeable`` says it follows a conv directly (it can be folded into that conv)."""
        return nn.BatchNorm2d(channels)


class ShakeDrop(nn.Module):
    """ShakeDrop at evaluation: the residual branch scaled by its expectation (1 - p_drop)."""

    def __init__(self, p_drop: float):
        super().__init__()
        self.p_drop = p_drop

    def forward(self, x: Tensor) -> Tensor:
        return x * (1.0 - self.p_drop)

    def extra_repr(self) -> str:
        return f"p_drop={self.p_drop:.4f}"


class Bottleneck(nn.Module):
    """A pre-activation bottleneck block with a zero-padded (and, at stride 2, average-pooled) shortcut."""

    def __init__(self, name: str, inplanes: int, planes: int, stride: int, p_drop: float, make: LayerFactory):
        super().__init__()
        self.bn1 = make.norm(f"{name}.bn1", inplanes, mergeable=False)
        self.conv1 = make.conv(f"{name}.conv1", inplanes, planes, 1, 1)
        self.bn2 = make.norm(f"{name}.bn2", planes, mergeable=True)
        self.conv2 = make.conv(f"{name}.conv2", planes, planes, 3, stride)
        self.bn3 = make.norm(f"{name}.bn3", planes, mergeable=True)
        self.conv3 = make.conv(f"{name}.conv3", planes, 4 * planes, 1, 1)
        self.bn4 = make.norm(f"{name}.bn4", 4 * planes, mergeable=True)
        self.relu = nn.ReLU()
        self.shake_drop = ShakeDrop(p_drop)
        self.downsample = nn.AvgPool2d(2, stride=2, ceil_mode=True) if stride != 1 else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        out = self.shake_drop(self.bn4(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        missing = out.shape[1] - shortcut.shape[1]
        return out + F.pad(shortcut, (0, 0, 0, 0, 0, missing))


class PyramidNet(nn.Module):
    """PyramidNet for 32x32 images with bottleneck blocks and ShakeDrop (evaluation form)."""

    def __init__(self, depth: int = 272, alpha: float = 200, num_classes: int = 100, make: LayerFactory | None = None):
        super().__init__()
        make = make or LayerFactory()
        stages = stage_widths(depth, alpha)
        total = sum(len(s) for s in stages)
        self.conv1 = make.conv("conv1", 3, 16, 3, 1)
        self.bn1 = make.norm("bn1", 16, mergeable=True)
        inplanes, index = 16, 0
        for s, planes_list in enumerate(stages):
            blocks = []
            for b, planes in enumerate(planes_list):
                index += 1
                stride = 2 if s > 0 and b == 0 else 1
                name = f"layer{s + 1}.{b}"
                blocks.append(Bottleneck(name, inplanes, planes, stride, 0.5 * index / total, make))
                inplanes = 4 * planes
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.final_width = inplanes
        self.bn_final = make.norm("bn_final", inplanes, mergeable=False)
        self.relu_final = nn.ReLU()
        self.avgpool = nn.AvgPool2d(8)
        self.fc = make.fc("fc", inplanes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn1(self.conv1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(self.relu_final(self.bn_final(x)))
        return self.fc(x.flatten(1))


def build(config: Mapping[str, Any]) -> PyramidNet:
    """PyramidNet (dense) from depth, alpha and the number of classes."""
    return PyramidNet(config["depth"], config["alpha"], config["num_classes"])


register(
    ModelSpec(
        name="pyramidnet-272",
        title="PyramidNet-272, alpha 200, bottleneck, ShakeDrop (CIFAR-100)",
        track="cifar100",
        build=build,
        default_config=DEFAULT_CONFIG,
        example_inputs=image_of("cifar100"),
        aliases=("pyramidnet",),
    )
)
