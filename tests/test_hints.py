"""The hints a model gives the counter (micronet_score.hints): record_function regions as rows, stored_at widths
of state carried between calls, and parameters declared unquantized. Expected numbers derived by hand."""

import pytest
import torch
from torch import nn
from torch.profiler import record_function

import micronet_score as ms
from micronet_score.errors import MicronetError
from micronet_score.hints import stored_at


class Regions(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4, bias=False)

    def forward(self, x):
        with record_function("double"):
            y = x * 2  # 2x4 = 8 mults
            with record_function("shift"):
                y = y + 1  # 8 adds
        return self.fc(y) * 3  # 2x4x4 = 32 mults, 2x4x3 = 24 adds; then 8 mults at the root


def test_record_function_regions_are_rows_under_their_module_after_it():
    report = ms.count(Regions(), torch.randn(2, 4), samples=1)
    rows = {r.name: (r.mults, r.adds, r.type) for r in report.layers}
    assert rows == {
        "": (8, 0, "Regions"),
        "double": (8, 0, "region"),
        "double.shift": (0, 8, "region"),
        "fc": (32, 24, "Linear"),
    }
    assert [r.name for r in report.layers] == ["", "double", "double.shift", "fc"]
    assert report.mults == 48 and report.adds == 32  # regions add rows, never counts


class Memory(nn.Module):
    """A layer with a memory of earlier calls: keys = [memory; Q4(x)], scores = x @ keys^T."""

    def __init__(self, declare: bool):
        super().__init__()
        self.declare = declare

    def forward(self, x, memory):
        q = torch.fake_quantize_per_tensor_affine(x, 0.1, 0, -8, 7)  # 16 levels: a 4-bit value
        kept = stored_at(memory, 4) if self.declare else memory
        keys = torch.cat([kept, q], 0)  # (3 + 2, 8)
        return q @ keys.t()  # 2 x 5 scores of 8 terms


@pytest.mark.parametrize("declare, mult_bits", [(True, 4), (False, 32)])
def test_stored_at_gives_state_from_earlier_calls_its_width(declare, mult_bits):
    x, memory = torch.randn(2, 8), torch.randn(3, 8)
    report = ms.count(Memory(declare), x, memory, samples=1)
    mults, adds = 2 * 5 * 8, 2 * 5 * 7
    # the scores multiply 4-bit q by keys: 4-bit keys where the memory is declared, else 32-bit (unknown memory)
    assert report.operations == pytest.approx(mults * mult_bits / 32 + adds)


def test_stored_at_is_the_identity_outside_a_count():
    t = torch.randn(3)
    assert stored_at(t, 4) is t


class Declared(nn.Module):
    def forward(self, memory):
        return stored_at(memory, 4) * 2


def test_stored_at_below_16_bits_refuses_the_freebie():
    with pytest.raises(MicronetError, match="freebie is not allowed: a value declared stored_at is 4 bits"):
        ms.count(Declared(), torch.randn(3, 8), samples=1, freebie=True)


class Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.norm = nn.LayerNorm(4)
        self.norm.unquantized = ("weight", "bias")
        with torch.no_grad():
            self.norm.weight.normal_()
            self.norm.bias.normal_()  # no zeros: every tensor stored dense

    def forward(self, x):
        return self.norm(self.fc(x))


def test_unquantized_parameters_keep_their_width_under_declared_bits():
    report = ms.count(Normed(), torch.randn(2, 6), samples=1, bits=8)
    # fc: 24 + 4 values at 8 bits; the norm's 4 + 4 at 32 bits
    assert report.storage == pytest.approx((24 + 4) * 8 / 32 + 8)
    weight_bits = ms.count(Normed(), torch.randn(2, 6), samples=1, bits=8, weight_bits={"norm.weight": 8})
    assert weight_bits.storage == pytest.approx((24 + 4 + 4) * 8 / 32 + 4)  # weight_bits still wins


def test_audit_checks_unquantized_parameters_against_their_own_width():
    from micronet_score.audit import audit

    model = Normed()
    with torch.no_grad():  # fc on an 8-bit grid, the norm left in floating point
        model.fc.weight.copy_(torch.randint(-128, 128, (4, 6)) / 64)
        model.fc.bias.copy_(torch.randint(-128, 128, (4,)) / 64)
    found = audit(model, bits=8)
    assert [v.tensor for v in found.violations] == []
    assert {t.name: t.declared_bits for t in found.tensors}["norm.weight"] is None


@pytest.mark.parametrize("declared", ["weight", ("weight", 3), ("gamma",)])
def test_a_malformed_unquantized_declaration_is_an_error(declared):
    model = Normed()
    model.norm.unquantized = declared
    with pytest.raises(MicronetError, match="module norm"):
        ms.count(model, torch.randn(2, 6), samples=1, bits=8)
