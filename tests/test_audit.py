"""Bits and sparsity read from the model, and the audit of what is declared (hand-derived references)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import micronet_score as ms
from micronet_score.audit import audit
from micronet_score.counting.blocks import detect
from micronet_score.counting.grid import mantissa_bits, measure, measure_rows

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:.*quantized tensor creation")
tq = torch.ao.quantization


def on_grid(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-tensor grid: s * q, |q| <= 2**(bits-1) - 1 (the extreme level used)."""
    top = 2 ** (bits - 1) - 1
    scale = weight.abs().max() / top
    return torch.round(weight / scale).clamp(-top, top) * scale


def truncate_mantissa(x: torch.Tensor, low_bits: int) -> torch.Tensor:
    """Zero the low mantissa bits of fp32 values (MIT's postprocess)."""
    return (x.view(torch.int32) & ~((1 << low_bits) - 1)).view(torch.float32)


def mit_weight(rows: int, cols: int, bits: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight pre-baked on a per-row symmetric grid: wq * inv(s), inv(s) = 1/s with 32-bits low mantissa bits
    zeroed (mit-lm.md §5.1); returns (weight, inverse scales)."""
    w = torch.randn(rows, cols)
    top = 2 ** (bits - 1) - 1
    scale = top / w.abs().amax(dim=1, keepdim=True)
    inv = truncate_mantissa(1 / scale, bits)
    return torch.round(w * scale).clamp(-top, top) * inv, inv


# --- measured widths -------------------------------------------------------------------------------------


def test_grid_widths_of_hand_quantized_values():
    torch.manual_seed(0)
    assert measure(on_grid(torch.randn(32, 16), 8)).bits == 8
    affine = torch.arange(16).float() * 0.25 + 0.1  # 16 levels from 0.1: 4 bits affine, 8 bits with zero on it
    grid = measure(affine)
    assert (grid.affine_bits, grid.symmetric_bits, grid.bits, grid.levels) == (4, 8, 4, 16)
    assert measure(torch.randn(64, 64)).bits is None  # fp32 values: on no grid


def test_mit_per_row_grid_and_truncated_scales():
    torch.manual_seed(0)
    weight, inv = mit_weight(16, 64)
    assert measure(weight).bits is None  # every row has its own scale
    assert measure_rows(weight) == (9, 16)
    # inv keeps sign, 8 exponent bits and 14 mantissa bits: at most 15 significant bits, 24 - (9 - 1) allowed
    assert max(mantissa_bits(float(v)) for v in inv.flatten()) <= 15
    assert mantissa_bits(1.0) == 1 and mantissa_bits(0.75) == 2 and mantissa_bits(1 / 3) == 24


# --- the audit ------------------------------------------------------------------------------------------


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def test_fp32_model_declared_8_bits_is_flagged():
    report = audit(mlp(), bits=8)
    assert {v.tensor for v in report.violations} == {"0.weight", "0.bias", "2.weight", "2.bias"}
    message = next(v.message for v in report.violations if v.tensor == "0.weight")
    assert message.startswith("0.weight: fp32 values declared as 8 bits: 2,048 distinct values lie on no uniform")
    with pytest.raises(ms.MicronetError, match="4 declared width"):
        report.raise_if_violations()


def test_8_bit_model_declared_8_bits_passes_and_7_fails():
    model = mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(on_grid(p, 8))
    report = audit(model, bits=8)
    assert report.ok, report.summary()
    assert report.tensor("0.weight").measured_bits == 8
    report.raise_if_violations()
    flagged = audit(model, bits=7)
    assert "0.weight: fp32 values declared as 7 bits" in flagged.violations[0].message
    assert "need 8 bits" in flagged.violations[0].message


def test_prune_reparametrisation_read_as_mask():
    model = mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(on_grid(p, 8))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    report = audit(model, bits=8)
    entry = report.tensor("0.weight")
    assert (entry.mask_source, entry.nonzeros, entry.density, entry.mask_bits) == ("prune", 1024, 0.5, 2048)
    assert report.ok
    assert "weight_orig" not in {t.name.rpartition(".")[2] for t in report.tensors}


class Masked(nn.Module):
    """A weight with a mask buffer saved beside it; the forward applies the mask."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4, 8))
        mask = torch.ones(4, 8)
        mask[:, :2] = 0
        self.register_buffer("weight_mask", mask)

    def forward(self, x):
        return x @ (self.weight * self.weight_mask).t()


def test_mask_beside_weight_counts_as_sparsity_in_audit_and_storage():
    model = Masked()
    entry = audit(model, bits=8).tensor("weight")
    assert (entry.mask_source, entry.nonzeros, entry.measured_bits) == ("mask", 24, 1)
    report = ms.count(model, torch.randn(1, 8), bits=8)
    # the two zero columns are two all-zero column blocks of eight: 24 values at 8 bits + 8 block bits, cheaper
    # than 24 nonzeros + a 32-bit mask (224) or dense (256); the same in audit; the mask buffer is not stored
    assert report.params == (24 * 8 + 8) / 32 and entry.stored_values * 8 + entry.mask_bits == 24 * 8 + 8
    assert report.mults == 24  # the dot products skip the masked weights; weight * mask is not inference work
    masked = ms.count(model, torch.randn(1, 8), bits=8, representation="masked")
    assert masked.params == (24 * 8 + 32) / 32 and masked.mults == 24  # forced: nonzeros + a 1-bit mask


def test_state_dict_masks_and_block_sparsity():
    weight = torch.ones(8, 8)
    weight[:4, :4] = 0  # one all-zero 4x4 block of four
    state = {"fc.weight": weight, "fc.weight.mask": torch.ones(8, 8), "fc.bias": torch.ones(8)}
    entry = audit(state, bits=1).tensor("fc.weight")
    assert (entry.mask_source, entry.block_shape, entry.block_source) == ("mask", (4, 4), "detected")
    assert (entry.blocks_kept, entry.stored_values, entry.mask_bits) == (3, 48, 4)
    declared = audit(state, block_shape=(2, 8)).tensor("fc.weight")
    assert (declared.block_shape, declared.blocks_kept, declared.stored_values, declared.mask_bits) == (
        (2, 8),
        4,
        64,
        4,
    )
    assert detect(torch.ones(8, 8)) is None


class Quantizer(nn.Module):
    """MIT ExplicitQuantize: Q(x) = round(clamp(x, -max_abs, max_abs) / inv_scale) * inv_scale."""

    def __init__(self, max_abs: float, bits: int, truncate: bool):
        super().__init__()
        self.output_bits = bits
        inv = torch.tensor([max_abs / (2 ** (bits - 1) - 1)])
        self.register_buffer("max_abs", torch.tensor([max_abs]))
        self.register_buffer("inv_scale", truncate_mantissa(inv, bits) if truncate else inv)

    def forward(self, x):
        return torch.round(x.clamp(-self.max_abs, self.max_abs) / self.inv_scale) * self.inv_scale


def mit_model(truncate: bool = True) -> nn.Module:
    torch.manual_seed(0)
    fc = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        fc.weight.copy_(mit_weight(32, 64)[0])
    return nn.Sequential(Quantizer(3.0, 9, truncate), fc)


def test_mit_quantizer_format_read_correctly():
    report = audit(mit_model(), bits=9, act_bits=9)
    assert report.ok, report.summary()
    entry = report.tensor("1.weight")
    assert (entry.measured_bits, entry.row_bits) == (None, 9)
    assert [(a.name, a.source, a.bits, a.scales) for a in report.activations] == [("0", "output_bits", 9, 1)]
    assert {t.name: t.role for t in report.tensors}["0.inv_scale"] == "quantizer"
    narrow = audit(mit_model(), bits=8, act_bits=8)
    assert {v.kind for v in narrow.violations} == {"width", "activation"}
    assert "need 9 bits (one scale per row)" in narrow.violations[0].message


def test_untruncated_scale_is_not_exact_in_fp32():
    report = audit(mit_model(truncate=False), bits=9, act_bits=9)
    assert [v.kind for v in report.violations] == ["scale"]
    assert "exact in fp32 only with at most 16" in report.violations[0].message


def test_act_bits_declared_without_any_quantizer_is_flagged():
    assert [v.kind for v in audit(mlp(), act_bits=8).violations] == ["activation"]


# --- torch.ao quantization: storage, ops, audit -----------------------------------------------------------


def test_dynamic_quantized_linear_counted_at_8_bits():
    torch.manual_seed(0)
    model = tq.quantize_dynamic(nn.Sequential(nn.Linear(8, 4)), {nn.Linear}, torch.qint8)
    report = ms.count(model, torch.randn(1, 8))
    # 32 int8 weights + 1 fp32 scale + 1 int8 zero point + 4 fp32 biases
    assert report.params == 32 * 8 / 32 + 1 + 8 / 32 + 4
    # dot products: 32 mults at 8 bits, 28 + 4 (bias) adds; the input's min and max: 2 * 8 - 2 comparisons, fp32
    assert (report.mults, report.adds, report.others) == (32, 32, 14)
    assert report.flops == 32 * 8 / 32 + 32 + 14
    assert not report.uncounted
    entry = audit(model, bits=8).tensor("0.weight")
    assert (entry.role, entry.dtype, entry.storage_bits) == ("packed", "qint8", 8)
    assert entry.measured_bits <= 8


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv, self.relu, self.fc = nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Linear(64, 3)

    def forward(self, x):
        x = self.relu(self.conv(self.quant(x)))
        return self.dequant(self.fc(x.flatten(1)))


@pytest.fixture(scope="module")
def qat_models():
    engine = "qnnpack" if "qnnpack" in torch.backends.quantized.supported_engines else "fbgemm"
    if engine not in torch.backends.quantized.supported_engines:
        pytest.skip("no quantized engine on this machine")
    torch.backends.quantized.engine = engine
    torch.manual_seed(0)
    model = Tiny()
    model.qconfig = tq.get_default_qat_qconfig(engine)
    prepared = tq.prepare_qat(model.train())
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.01)
    for _ in range(3):
        loss = prepared(torch.randn(4, 1, 6, 6)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    prepared.eval()
    return prepared, tq.convert(prepared)


def test_qat_prepared_model_multiplies_at_fake_quantized_widths(qat_models):
    prepared, _ = qat_models
    report = ms.count(prepared, torch.randn(1, 1, 6, 6))
    # conv: 4 x 4 x 4 outputs of 9 terms, input and weight fake-quantized to 8 bits (the fp32 bias adds at 32)
    conv = report.layer("conv")
    assert (conv.mults, conv.adds) == (576, 576) and conv.flops == 576 * 8 / 32 + 576
    assert report.layer("relu").flops == 64 * 8 / 32  # relu of the conv's 8-bit fake-quantized output
    assert not report.uncounted
    found = audit(prepared, act_bits=8)
    assert {a.bits for a in found.activations} == {8} and len(found.activations) == 5
    assert {v.kind for v in found.violations} <= {"scale"}  # observers' scales are arbitrary floats


def test_qat_converted_model_counts_packed_weights(qat_models):
    _, converted = qat_models
    report = ms.count(converted, torch.randn(1, 1, 6, 6))
    conv, fc = converted.conv, converted.fc
    nz_conv = int(torch.count_nonzero(conv.weight().dequantize()))
    nz_fc = int(torch.count_nonzero(fc.weight().dequantize()))
    # int8 weight nonzeros (+ a mask if any zero), weight scale, zero point, output scale, zero point, fp32 bias
    meta = 1 + 8 / 32 + 1 + 8 / 32
    mask_conv = 36 / 32 if nz_conv < 36 else 0
    mask_fc = 192 / 32 if nz_fc < 192 else 0
    assert report.layer("conv").storage == nz_conv * 8 / 32 + mask_conv + meta + 4
    assert report.layer("fc").storage == nz_fc * 8 / 32 + mask_fc + meta + 3
    assert report.layer("quant").storage == 2  # the input quantizer's scale and zero point, read by the forward
    # 64 outputs of 9 * density terms: 16 * nonzeros mults at 8 bits; 16 * nonzeros - 64 + 64 (bias) adds
    assert report.layer("conv").mults == 16 * nz_conv
    assert report.layer("conv").flops == 16 * nz_conv * 8 / 32 + (16 * nz_conv - 64) + 64
    assert report.layer("relu").flops == 64 * 8 / 32  # relu of a quint8 tensor
    assert not report.uncounted
    found = audit(converted, bits=8)
    assert {t.name for t in found.tensors if t.role == "packed"} == {"conv.weight", "fc.weight"}
    assert {v.tensor for v in found.violations} == {"conv.bias", "fc.bias"}  # torch.ao keeps biases in fp32


# --- widths flowing through the graph ---------------------------------------------------------------------


class Flow(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4, bias=False)
        self.fc2 = nn.Linear(8, 2, bias=False)
        self.register_buffer("table", torch.randn(2, 16))

    def forward(self, x):
        x = torch.fake_quantize_per_tensor_affine(x, 0.1, 0, -8, 7)  # 16 levels: 4 bits
        x = torch.cat([x, torch.relu(x)], dim=1)  # cat and relu keep the 4-bit grid
        y = self.fc(x)
        z = x * self.table  # a 4-bit activation times an fp32 table: a 32-bit multiply
        w = self.fc2(x[:, :8] + 1.0)  # arithmetic: unknown width, the declared activation width
        return y, z, w


def test_widths_flow_through_the_graph():
    report = ms.count(Flow(), torch.randn(1, 8), bits=4, act_bits=8)
    assert report.layer("").others == 0
    # fc: 4 outputs of 16 terms at max(4-bit input, 4-bit weight); 15 adds each at 32
    # fc2: 2 outputs of 8 terms at max(8-bit fallback, 4-bit weight); 7 adds each
    dot = report.family("dot_product")
    assert dot.flops == 64 * 4 / 32 + 60 + 16 * 8 / 32 + 14
    assert report.family("mul").flops == 32 * 32 / 32
    assert report.family("relu").flops == 8 * 4 / 32
    assert report.family("add").flops == 8  # x + 1.0: 8 adds at 32 bits
    # without the flow (every activation at the 8-bit fallback) fc would cost 64 * 8 / 32 + 60
    declared_only = 64 * 8 / 32 + 60 + 16 * 8 / 32 + 14
    assert declared_only - dot.flops == 64 * (8 - 4) / 32


def test_fp32_values_declared_at_32_bits_hold():
    # A tensor declared at its storage width needs no grid: 32-bit floats declared as 32 bits hold.
    net = nn.Linear(16, 4)
    result = audit(net, bits=32)
    assert result.violations == []
