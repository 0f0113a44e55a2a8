"""Shape-only counting (a meta copy of the model, the real model's widths and densities) and the fast nonzero
count: the same totals and rows as a real run, the real model untouched, a clear error for data-dependent flow."""

from __future__ import annotations

import pytest
import torch
from micronet_score.models.mobilenet_v2 import MobileNetV2
from micronet_score.models.wrn import WideResNet
from torch import nn
from torch.nn.utils import prune

import micronet_score as ms
from micronet_score.counting.storage import count_nonzero, count_nonzeros


def rows(report: ms.Report) -> list[dict]:
    return [row.model_dump() for row in report.layers]


def assert_same(real: ms.Report, shapes: ms.Report) -> None:
    for key in ("mults", "adds", "others", "params", "flops", "samples", "conversions"):
        assert getattr(shapes, key) == getattr(real, key), key
    assert rows(shapes) == rows(real)
    assert [o.model_dump() for o in shapes.ops] == [o.model_dump() for o in real.ops]
    assert [u.model_dump() for u in shapes.uncounted] == [u.model_dump() for u in real.uncounted]
    assert shapes.warnings == real.warnings


def state(model: nn.Module) -> dict:
    return {k: (v.clone(), v._version) for k, v in model.state_dict(keep_vars=True).items()}


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for key, (value, version) in before.items():
        assert after[key].device == value.device
        assert torch.equal(after[key], value) and after[key]._version == version, key


def check(model: nn.Module, x: torch.Tensor, **options) -> ms.Report:
    before = state(model)
    real = ms.count(model, x, **options)
    shapes = ms.count(model, x, shape_only=True, **options)
    assert_same(real, shapes)
    assert_same(real, ms.count_shapes(model, x, **options))
    assert_untouched(model, before)
    return shapes


def test_wrn_shape_only_equals_real():
    torch.manual_seed(0)
    check(WideResNet(10, 2).eval(), torch.randn(2, 3, 32, 32))


def test_mobilenet_shape_only_equals_real():
    torch.manual_seed(0)
    check(MobileNetV2(0.35).eval(), torch.randn(1, 3, 64, 64), bits=8)


def test_pruned_model_keeps_its_densities():
    torch.manual_seed(0)
    model = WideResNet(10, 1).eval()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            prune.l1_unstructured(m, "weight", amount=0.7)
    with torch.no_grad():  # and plain zeros in the classifier
        model.fc.weight[:, ::2] = 0
    r = check(model, torch.randn(1, 3, 32, 32))
    assert r.layer("fc").density == pytest.approx(0.5, abs=0.01)
    assert any(row.density is not None and row.density < 0.35 for row in r.layers)


class QuantizedWidths(nn.Module):
    """Fake-quantized activations, an output_bits module and declared weight widths."""

    class Quantizer(nn.Module):
        output_bits = 4

        def forward(self, x):
            return torch.round(x.clamp(-1, 1) * 7) / 7

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.q = self.Quantizer()
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = torch.fake_quantize_per_tensor_affine(x, 0.1, 0, -128, 127)
        x = self.q(torch.relu(self.bn(self.conv(x))))
        return self.fc(x.flatten(1))


def test_quantized_widths_flow_the_same():
    torch.manual_seed(0)
    model = QuantizedWidths().eval()
    r = check(model, torch.randn(2, 3, 8, 8), bits=4, act_bits=8, weight_bits={"fc.weight": 2})
    assert r.conversions > 0
    assert r.layer("fc").bits == 4  # the widest of its tensors: weight 2 bits, bias 4


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        if y.sum() > 0:  # needs a value
            return y
        return -y


def test_data_dependent_model_says_to_count_without_shape_only():
    model = DataDependent().eval()
    before = state(model)
    with pytest.raises(ms.MicronetError, match="without shape_only"):
        ms.count(model, torch.randn(1, 4), shape_only=True)
    assert_untouched(model, before)
    assert ms.count(model, torch.randn(1, 4)).mults > 0  # and the real run still counts it


def test_counter_count_shapes_accumulates_like_measure():
    torch.manual_seed(0)
    model = WideResNet(10, 1).eval()
    x = torch.randn(3, 3, 32, 32)
    real, shapes = ms.Counter(model), ms.Counter(model)
    for _ in range(2):
        with real.measure():
            model(x)
        shapes.count_shapes(x)
    assert shapes.samples == real.samples == 6
    assert_same(real.report(), shapes.report())


def test_nonzeros_on_the_bits_equal_torch_count_nonzero():
    torch.manual_seed(0)
    tensors = []
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.bool):
        for n in (0, 1, 5, 3000, 20000, 70000, 200001):
            t = (torch.randn(n) * 3).to(dtype)
            if dtype.is_floating_point and n:
                if n < 200001:
                    t[::3] = 0.0
                    t[1::7] = -0.0
                    t[2::11] = float("nan")
                else:  # a dense tensor but for two zeros, one of each sign, in different chunks
                    t[123_456] = -0.0
                    t[190_000] = 0.0
            tensors.append(t)
    tensors += [torch.randn(50, 40).t(), torch.randn(10, requires_grad=True), nn.Parameter(torch.zeros(7))]
    expected = [(int(torch.count_nonzero(t.detach())), True) for t in tensors]
    assert count_nonzeros(tensors) == expected
    assert [count_nonzero(t) for t in tensors] == expected
    assert count_nonzero(torch.empty(3, 4, device="meta")) == (12, False)


def test_counter_count_shapes_follows_train_and_eval():
    torch.manual_seed(0)
    model = WideResNet(10, 1)
    x = torch.randn(2, 3, 32, 32)
    counter = ms.Counter(model)
    model.eval()
    counter.count_shapes(x)
    model.train()
    counter.count_shapes(x)
    model.eval()
    real = ms.Counter(model)
    with real.measure():
        model(x)
    model.train()
    with real.measure():
        model(x)
    model.eval()
    assert_same(real.report(), counter.report())


def test_packed_quantized_model_says_to_count_without_shape_only():
    import torch.ao.quantization as tq

    model = tq.quantize_dynamic(nn.Sequential(nn.Linear(8, 4)), {nn.Linear}, torch.qint8)
    with pytest.raises(ms.MicronetError, match="without shape_only"):
        ms.count(model, torch.randn(1, 8), shape_only=True)


def test_counter_rebuilds_its_table_when_a_tensor_is_replaced():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8, bias=False)).eval()
    x = torch.randn(1, 16)
    counter = ms.Counter(model)
    with counter.measure():
        model(x)
    assert counter.report().layer("0").density == 1.0
    weight = torch.randn(8, 16)
    weight[:, :12] = 0
    model[0].weight = nn.Parameter(weight)  # a new tensor, never modified in place: version 0 like the old one
    counter.reset()
    counter.count_shapes(x)
    r = counter.report()
    assert r.layer("0").density == 0.25
    assert r.mults == 8 * 4
