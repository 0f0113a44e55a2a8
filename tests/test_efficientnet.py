"""EfficientNet-B0: the published parameter count, derived part by part."""

from __future__ import annotations

import torch
from micronet_score.models import efficientnet
from micronet_score.models.registry import get
from torch import nn


def count(model: nn.Module, kind: type) -> int:
    return sum(p.numel() for m in model.modules() if isinstance(m, kind) for p in m.parameters(recurse=False))


def test_parameter_count_is_the_published_5288548_with_batch_norm():
    spec = get("efficientnet-b0")
    assert spec.track == "imagenet"
    with torch.device("meta"):
        model = spec.build(spec.default_config)
    # Our figure, by part: convolutions 3,965,532 (of which squeeze-and-excitation weights and biases 636,540),
    # batch norm affine 42,016 (2 x 21,008 channels), fc 1280 x 1000 + 1000 = 1,281,000.
    assert count(model, nn.Conv2d) == 3_965_532
    assert sum(p.numel() for m in model.modules() if isinstance(m, efficientnet.SqueezeExcite)
               for p in m.parameters()) == 636_540
    assert count(model, nn.BatchNorm2d) == 42_016
    assert count(model, nn.Linear) == 1_281_000
    assert sum(p.numel() for p in model.parameters()) == 5_288_548  # published (Tan & Le; reference code)


def test_structure_and_forward_shape():
    model = efficientnet.EfficientNet(num_classes=7).eval()
    assert len(model.blocks) == 16
    assert [b.residual for b in model.blocks].count(True) == 9
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 7)
    assert get("efficientnet").example_inputs(model)[0].shape == (1, 3, 224, 224)
