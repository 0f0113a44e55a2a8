"""Counting only reads the model (issue 12, item 2): every buffer ends bit-identical, whatever the model's modules
do in their forward (fake-quantizer observers, plain observers, batch norm in training mode, a module's own state).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import micronet_score as ms
from micronet_score.checkpoint import LoadedModel
from micronet_score.scoring import CountOptions, measure_example


def _bits(model: nn.Module) -> dict[str, bytes]:
    """Every buffer's raw bytes (a NaN or -0.0 compares by its bits), by name."""
    return {name: bytes(b.detach().reshape(-1).contiguous().view(torch.uint8).numpy())
            for name, b in model.named_buffers()}


def _qat_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(torch.ao.quantization.QuantStub(), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          torch.ao.quantization.DeQuantStub())
    model.qconfig = torch.ao.quantization.get_default_qat_qconfig("fbgemm")
    model.train()
    prepared = torch.ao.quantization.prepare_qat(model)
    prepared(torch.randn(2, 3, 8, 8))  # calibrated on small inputs
    return prepared.eval()


def _observed_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(torch.ao.quantization.QuantStub(), nn.Conv2d(3, 4, 3), nn.ReLU(),
                          torch.ao.quantization.DeQuantStub()).eval()
    model.qconfig = torch.ao.quantization.default_qconfig
    prepared = torch.ao.quantization.prepare(model)
    prepared(torch.randn(2, 3, 8, 8))
    return prepared


class Stateful(nn.Module):
    """A module that keeps state in its forward (a call counter and the last input's maximum)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("peak", torch.tensor(-0.0))

    def forward(self, x):
        self.calls += 1
        self.peak = torch.maximum(self.peak, x.max())  # replaces the buffer object
        return self.fc(x)


def _train_mode_bn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()


MODELS = {
    "prepare_qat in eval mode": (_qat_model, (1, 3, 8, 8)),
    "prepare (observers)": (_observed_model, (1, 3, 8, 8)),
    "batch norm in train mode": (_train_mode_bn, (2, 3, 8, 8)),
    "module with its own state": (Stateful, (2, 4)),
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_count_leaves_every_buffer_bit_identical(kind):
    build, shape = MODELS[kind]
    model = build()
    before = _bits(model)
    objects = {name: b for name, b in model.named_buffers()}
    ms.count(model, torch.randn(*shape) * 10, track="cifar100")  # inputs far outside the calibration range
    assert _bits(model) == before
    assert all(b is objects[name] for name, b in model.named_buffers())


@pytest.mark.parametrize("kind", list(MODELS))
def test_measuring_for_the_cli_leaves_every_buffer_bit_identical(kind):
    """The path of count/eval/breakdown (scoring.measure_example), which also switches the model to eval mode."""
    build, shape = MODELS[kind]
    model = build()
    before, training = _bits(model), model.training
    loaded = LoadedModel("pickled module", model, {}, {}, (torch.randn(*shape) * 10,))
    measure_example(loaded, CountOptions(track="cifar100"))
    assert _bits(model) == before and model.training == training


def test_observers_are_off_while_counting():
    """The counted forward quantizes with the stored scale (the deployed model), not one fitted to the input."""
    model = _qat_model()
    x = torch.randn(1, 3, 8, 8) * 10
    scale = model[0].activation_post_process.scale.clone()
    seen = []
    handle = model[1].register_forward_pre_hook(lambda m, args: seen.append(model[0].activation_post_process.scale
                                                                             .clone()))
    ms.count(model, x, track="cifar100")
    handle.remove()
    assert torch.equal(seen[0], scale)
